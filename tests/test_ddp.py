"""Two CPU processes under DDP give the numbers of one process on the same global batches: logged
metrics (module, EntropyMonitor, EntropyController), controller coefficients and final weights.
The assertions run inside hooks on the workers (DESIGN.md)."""

from __future__ import annotations

import copy
import os
import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric

from entreg.callbacks import EntropyController, EntropyMonitor
from entreg.modules import ClassificationModule
from tests.helpers import RankInterleaved, RecordingLogger, SignalDuringBatch, make_trainer

RANK_BATCH, WORLD = 8, 2


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def loaders(world: int) -> tuple[DataLoader, DataLoader]:
    """Global batch k is samples [16k, 16k + 16) whatever the number of processes."""
    train, val = dataset(64, 0), dataset(24, 1)
    if world == 1:
        return DataLoader(train, batch_size=RANK_BATCH * WORLD), DataLoader(val, batch_size=RANK_BATCH * WORLD)
    return (
        DataLoader(train, batch_size=RANK_BATCH, sampler=RankInterleaved(len(train))),
        DataLoader(val, batch_size=RANK_BATCH, sampler=RankInterleaved(len(val))),
    )


def model() -> ClassificationModule:
    torch.manual_seed(0)  # GroupNorm: no batch statistics, so DDP's averaged gradients equal one process's
    return ClassificationModule(
        "small_cnn", 4, 1, backbone_kwargs={"widths": (4, 8), "norm": "group"}, confidence_penalty=0.1
    )


def callbacks() -> list[L.Callback]:
    return [
        EntropyMonitor(features="backbone.features", stages=("train", "val")),
        EntropyController("confidence_penalty.coef", target=1.3, kp=0.5, ki=0.2),
    ]


class ExpectSingleProcess(L.Callback):
    """Runs on every worker at the end of the fit and compares with the one-process run."""

    def __init__(self, logged: dict[str, list[float]], coef: float) -> None:
        self.logged, self.coef = logged, coef

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert trainer.world_size == WORLD
        controller = next(cb for cb in trainer.callbacks if isinstance(cb, EntropyController))
        assert controller.coef == pytest.approx(self.coef, rel=1e-5)  # every rank holds the same coefficient
        assert pl_module.confidence_penalty.coef == controller.coef
        if trainer.is_global_zero:  # only rank zero writes to loggers
            logger = next(lg for lg in trainer.loggers if isinstance(lg, RecordingLogger))
            for key, values in self.logged.items():
                assert logger.values(key) == pytest.approx(values, rel=1e-5, abs=1e-6), key


def single_process_reference(tmp_path) -> tuple[ClassificationModule, dict[str, list[float]], float]:
    single, logger = model(), RecordingLogger()
    controller = callbacks()
    trainer = make_trainer(tmp_path, logger=logger, callbacks=controller, max_epochs=2)
    trainer.fit(single, *loaders(world=1))
    keys = {k for _, metrics in logger.records for k in metrics} - {"epoch"}
    logged = {k: logger.values(k) for k in sorted(keys)}
    assert {"train/pred_entropy", "val/repr_entropy", "controller/confidence_penalty.coef", "val/ece"} <= keys
    return single, logged, controller[1].coef


@pytest.mark.parametrize("strategy", ["ddp_fork", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_ddp_equals_one_process_on_the_global_batch(tmp_path, strategy):
    single, logged, coef = single_process_reference(tmp_path)
    ddp_model = model()
    trainer = make_trainer(
        tmp_path,
        devices=WORLD,
        strategy=strategy,
        max_epochs=2,
        enable_progress_bar=True,  # the default: rank 0's bar reduces epoch metrics that rank 1 reduces later
        use_distributed_sampler=False,
        logger=RecordingLogger(),
        callbacks=[*callbacks(), ExpectSingleProcess(logged, coef)],
    )
    trainer.fit(ddp_model, *loaders(world=WORLD))
    for (name, a), b in zip(ddp_model.state_dict().items(), single.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class AssertOwnMemory(L.Callback):
    """On each spawned worker: no metric state of entreg lives in shared memory (the callbacks build
    theirs during the run, never before the launch)."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
        states = [getattr(m, name) for m in metrics for name in m._defaults]
        states = [t for t in states if isinstance(t, torch.Tensor)]  # list states are rebuilt per process anyway
        assert len(states) > 10 and not any(t.is_shared() for t in states)


def test_ddp_spawn_keeps_entreg_state_per_process(tmp_path):
    """ddp_spawn moves tensors made before the launch into shared memory, where both ranks would add
    into the same storage. entreg re-allocates its states in ``setup``: each spawned process owns its
    states, and the test metrics of two processes equal one process on the same data."""
    net = model()
    reference = make_trainer(tmp_path).test(copy.deepcopy(net), loaders(world=1)[1], verbose=False)[0]
    spawned = make_trainer(
        tmp_path,
        devices=WORLD,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        callbacks=[EntropyMonitor(stages=("test",)), AssertOwnMemory()],
    )
    result = spawned.test(net, loaders(world=WORLD)[1], verbose=False)[0]
    assert {k: v for k, v in result.items() if "pred_entropy" not in k} == pytest.approx(reference, rel=1e-5)
    assert result["test/pred_entropy_mean"] == pytest.approx(reference["test/entropy_mean"], rel=1e-5)


@pytest.mark.parametrize("progress_bar", ["rich", "tqdm"])
def test_entreg_train_ddp_sim_with_the_default_callbacks_and_progress_bar(tmp_path, progress_bar):
    """The CLI as a user first runs it on 2 processes: default callbacks (RichProgressBar), the
    EntropyMonitor, TensorBoard. Every epoch end of ClassificationModule and EntropyMonitor holds
    collectives; they must meet the same collectives on both ranks."""
    import subprocess
    import sys
    from pathlib import Path

    entry = Path(sys.executable).parent / "entreg-train"
    args = [str(entry), "trainer=ddp_sim", "callbacks=entropy", "trainer.max_epochs=2", "data.size=8"]
    args += ["+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]
    if progress_bar == "tqdm":
        args += ["callbacks.progress_bar=null"]  # Lightning's default TQDM bar
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENTREG_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stdout + result.stderr and "mean entropy" in result.stdout
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


class ExpectStoppedTogether(L.Callback):
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from entreg.callbacks import TrainingInterrupted

        if isinstance(exception, TrainingInterrupted):  # on each worker (the main process sees them exit)
            assert exception.code == 128 + signal.SIGUSR1
            assert trainer.global_step == 3  # both ranks finished step 2 and stopped before step 3


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_batch_with_one_checkpoint(tmp_path):
    """The stop decision is reduced over the ranks, so a preemption signal that reaches one process (as SLURM may
    deliver it) stops both at the same batch, and the checkpoint holds that step; no rank waits in a collective."""
    from torch.multiprocessing import ProcessExitedException

    from entreg.callbacks import InterruptCheckpoint

    train, _ = loaders(WORLD)
    rank_1_at_step_2 = SignalDuringBatch(lambda t, _: t.global_step == 2 and t.global_rank == 1, signal.SIGUSR1)
    callbacks = [rank_1_at_step_2, InterruptCheckpoint(dirpath=tmp_path / "ckpt"), ExpectStoppedTogether()]
    trainer = make_trainer(tmp_path, devices=WORLD, strategy="ddp_fork", max_epochs=5, callbacks=callbacks)
    with pytest.raises(ProcessExitedException, match="terminated with exit code 138"):  # SystemExit(128 + SIGUSR1)
        trainer.fit(model(), train)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
