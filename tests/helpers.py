"""Shared test utilities: a logger that records every logged value, a trainer factory, outputs recorded
by hand, a sampler that splits a global batch across DDP ranks, an env with non-finite transitions and an RL agent's
epoch ends."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor


class EpochEnds(L.Callback):
    """An RL agent's env steps (and the epoch) at every epoch end."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, int]] = []  # (epoch, env steps)

    @property
    def steps(self) -> list[int]:
        return [steps for _, steps in self.epochs]

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epochs.append((trainer.current_epoch, module.env_steps))


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, {name: value})``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[float]:
        """Every logged value of ``key``, in order."""
        return [metrics[key] for _, metrics in self.records if key in metrics]


class SignalDuringBatch(L.Callback):
    """Sends ``signum`` to this process as a training batch starts when ``when(trainer, module)`` holds, as Ctrl-C
    or ``kill`` would during that batch."""

    def __init__(self, when: Any, signum: int = signal.SIGINT) -> None:
        self.when, self.signum = when, signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.when(trainer, pl_module):
            os.kill(os.getpid(), self.signum)


def make_trainer(tmp_path, **kwargs: Any) -> L.Trainer:
    """A small CPU trainer; multi-process runs keep Lightning's default progress bar on, as a user's do
    (it reduces epoch metrics on rank 0 only, which once hid a collective mismatch)."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "log_every_n_steps": 1,
        "enable_progress_bar": kwargs.get("devices", 1) != 1,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**options, **kwargs})


class OutputRecorder(L.Callback):
    """Records, independently of entreg, the first output of ``module`` in every batch of each stage."""

    def __init__(self, module: str = "") -> None:
        self.module = module
        self.outputs: dict[str, list[Any]] = {"train": [], "val": [], "test": []}
        self._handle = None

    def _start(self, pl_module: L.LightningModule, stage: str) -> None:
        seen: list[Tensor] = []

        def hook(mod: torch.nn.Module, args: Any, output: Any) -> None:
            if not seen:
                seen.append(torch.utils._pytree.tree_map(lambda t: t.detach().clone(), output))
                self.outputs[stage].append(seen[0])

        self._handle = pl_module.get_submodule(self.module).register_forward_hook(hook)

    def _end(self) -> None:
        self._handle.remove()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start(pl_module, "train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._start(pl_module, "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._end()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(pl_module, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end()


def entropy_by_hand(logits: Tensor) -> Tensor:
    """-sum softmax * log_softmax over the last dimension, in float64."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class RankInterleaved(torch.utils.data.Sampler):
    """Rank r of w reads samples r, r+w, r+2w, ... of ``size``: with batch b per rank, global batch k
    of one process with batch b*w is the union of the ranks' k-th batches."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.size, world))


def nan_pendulum_id() -> str:
    """The gymnasium id of InvertedPendulum-v5 with a NaN reward every 7th step and a NaN observation every 11th
    (the agents' non-finite-transition tests), registered on first use."""
    import gymnasium as gym

    env_id = "entreg-test/NaNInvertedPendulum-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=_nan_pendulum, disable_env_checker=True)
    return env_id


def _nan_pendulum(**kwargs: Any) -> Any:
    import gymnasium as gym
    import numpy as np

    class NaNEvery7thRewardAnd11thObservation(gym.Wrapper):
        def __init__(self, env: Any) -> None:
            super().__init__(env)
            self.t = 0

        def step(self, action: Any) -> tuple:
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.t += 1
            reward = float("nan") if self.t % 7 == 0 else reward
            obs = np.full_like(obs, np.nan) if self.t % 11 == 0 else obs
            return obs, reward, terminated, truncated, info

    return NaNEvery7thRewardAnd11thObservation(gym.make("InvertedPendulum-v5", **kwargs))
