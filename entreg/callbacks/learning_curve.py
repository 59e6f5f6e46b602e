"""The learning curve of an RL agent (SACModule, PPOModule): every periodic evaluation with the policy's noise, and
a fit that collects it and resumes where it was stopped."""

from __future__ import annotations

import inspect
import json
import math
import shutil
import signal
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from entreg.callbacks.interrupt_checkpoint import InterruptCheckpoint, TrainingInterrupted
from entreg.rl.envs import POLICY_TAGS

__all__ = ["LearningCurve", "fit_learning_curve"]


class LearningCurve(L.Callback):
    """Collects an RL agent's evaluations into a learning curve, the data of ``scripts/bench_rl.py``'s tables.

    After every training step it reads the module's ``last_evaluation`` (an :class:`entreg.rl.envs.Evaluation`, set
    at each multiple of the module's ``eval_every`` env steps and at the end of ``total_steps``) and, when it is new,
    appends a point: env ``step``, evaluation ``seed``, ``mean`` return, every episode's ``returns``, and the latest
    logged ``policy/std``, ``policy/entropy`` and ``policy/gaussian_entropy`` (how much noise the policy had then;
    a tag the agent has not logged yet is left out).
    The points are in :attr:`points`, survive checkpoints (``state_dict``), and with ``path`` are written there as
    JSON after every new point (rank 0).

    :meth:`final` is the last point's mean return, :meth:`auc` the mean of all points' means (the area under the curve
    over equally spaced evaluations: it rewards learning early).

    Example:
        >>> from entreg.modules.ppo import PPOModule
        >>> module = PPOModule("InvertedPendulum-v5", n_steps=64, batch_size=64, n_epochs=1, total_steps=128,
        ...                    eval_every=64, eval_episodes=1)
        >>> curve = LearningCurve()
        >>> trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, callbacks=[curve])
        >>> trainer.fit(module)
        >>> [point["step"] for point in curve.points], sorted(curve.points[0])
        ([64, 128], ['mean', 'policy/entropy', 'policy/gaussian_entropy', 'policy/std', 'returns', 'seed', 'step'])
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.points: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "last_evaluation"):
            raise TypeError(
                f"LearningCurve records an RL agent's evaluations (a module with `last_evaluation`, e.g. SACModule, "
                f"PPOModule); {type(pl_module).__name__} has none"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        record = pl_module.last_evaluation
        if record is None or (self.points and self.points[-1]["step"] >= record.step):
            return
        point = record.as_dict()
        metrics = trainer.callback_metrics
        point |= {tag: float(metrics[tag]) for tag in POLICY_TAGS if tag in metrics}  # strict JSON: no NaN
        self.points.append(point)
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.points, indent=1))

    def curve(self) -> list[list[float]]:
        """``[[step, mean return], ...]``."""
        return [[point["step"], point["mean"]] for point in self.points]

    def final(self) -> float:
        """The last evaluation's mean return."""
        return self.points[-1]["mean"]

    def auc(self) -> float:
        """The mean over the evaluations of their mean return."""
        return math.fsum(point["mean"] for point in self.points) / len(self.points)

    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(point) for point in self.points]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(point) for point in state_dict["points"]]


class TrainClock(L.Callback):
    """Wall time of a fit without the agent's evaluations (its ``eval_seconds``), summed over resumed segments:
    the time so far is in the checkpoint, and :attr:`segments` counts the fits that made it."""

    def __init__(self) -> None:
        self.before, self.segments = 0.0, 0
        self._start = self._eval_start = 0.0
        self._module: L.LightningModule | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module, self._start, self._eval_start = pl_module, time.perf_counter(), pl_module.eval_seconds
        self.segments += 1

    def seconds(self) -> float:
        if self._module is None:
            return self.before
        evaluations = self._module.eval_seconds - self._eval_start
        return self.before + time.perf_counter() - self._start - evaluations

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "segments": self.segments}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before, self.segments = state_dict["seconds"], state_dict["segments"]


def fit_learning_curve(
    module: L.LightningModule,
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[LearningCurve, float, int]:
    """Train an RL agent (SACModule, PPOModule) to its ``total_steps`` on the CPU with a :class:`LearningCurve`, no
    logger: ``(curve, train seconds without evaluations, segments)``; ``callbacks`` are added to the trainer's.

    With ``checkpoint_dir`` the fit resumes: ``<checkpoint_dir>/last.ckpt`` is written at every epoch end (the
    module's ``steps_per_epoch``) and, through :class:`InterruptCheckpoint`, at the end of the current step on
    SIGTERM or Ctrl-C (then :class:`TrainingInterrupted` is raised, for SIGTERM too); a call that finds the file
    continues from it exactly (agent, replay buffer or rollout state, envs, the curve so far, the train time so far),
    as if never stopped, and ``segments`` counts the fits that made the run; a checkpoint written with other
    hyperparameters is refused (ValueError naming them). The folder is deleted once the run is complete.

    Example:
        >>> from entreg.modules.ppo import PPOModule
        >>> module = PPOModule("InvertedPendulum-v5", n_steps=64, batch_size=64, n_epochs=1, total_steps=128,
        ...                    eval_every=64, steps_per_epoch=64, eval_episodes=1)
        >>> curve, seconds, segments = fit_learning_curve(module)
        >>> [point["step"] for point in curve.points], seconds > 0, segments
        ([64, 128], True, 1)
    """
    curve, clock, interrupt = LearningCurve(), TrainClock(), None
    callbacks = [curve, clock, *callbacks]
    resume = None
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        every_epoch = ModelCheckpoint(folder, filename="last", enable_version_counter=False)  # one file, replaced
        interrupt = InterruptCheckpoint(folder)
        callbacks += [every_epoch, interrupt]
        resume = folder / "last.ckpt" if (folder / "last.ckpt").is_file() else None
        if resume is not None:
            _check_same_run(resume, module)
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    options["enable_checkpointing"] = checkpoint_dir is not None
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", callbacks=callbacks, devices=1, **options)
    try:
        with warnings.catch_warnings():  # resuming: the folder holds the checkpoint on purpose
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            trainer.fit(module, ckpt_path=resume, weights_only=True)
    except SIGTERMException:  # Lightning stops on SIGTERM itself, after InterruptCheckpoint's checkpoint
        raise TrainingInterrupted(signal.SIGTERM, interrupt.saved if interrupt is not None else None) from None
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return curve, clock.seconds(), clock.segments


def _check_same_run(path: Path, module: L.LightningModule) -> None:
    """Refuse to resume ``path`` with a module whose hyperparameters differ from the checkpoint's. A hyperparameter
    that the checkpoint lacks (it predates the option) matches when the module has it at its default."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    ours = dict(module.hparams)
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(type(module).__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty and name not in saved
    }
    saved = {**defaults, **saved}
    differ = sorted(k for k in saved.keys() | ours.keys() if _plain(saved.get(k)) != _plain(ours.get(k)))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise ValueError(
            f"{path} was written by a run with other settings ({changes}): delete {path.parent} to start over, or "
            "resume with the same settings"
        )


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a saved hyperparameter may come back as either)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
