"""A fit that crashes after k steps and is resumed from its last checkpoint, or is stopped by a signal in the
middle of an epoch and resumed from the checkpoint the signal wrote, ends bit for bit where an uninterrupted fit
ends: weights, optimizer state, callback states and every logged value."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from entreg.callbacks import EntropyController, EntropyMonitor, InterruptCheckpoint, TrainingInterrupted
from entreg.data import DigitsDataModule
from entreg.modules import ClassificationModule
from tests.helpers import RecordingLogger, SignalDuringBatch, make_trainer

STEPS_PER_EPOCH, EPOCHS = 8, 3


class Interrupted(Exception):
    pass


class CrashAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"simulated crash at step {self.step}")


def run(
    tmp_path: Path,
    name: str,
    crash_at: int | None = None,
    resume: Path | None = None,
    signal_at: tuple[int, int] | None = None,
) -> dict[str, Any]:
    L.seed_everything(0)
    model = ClassificationModule(
        "small_cnn", 10, 1, backbone_kwargs={"widths": (8, 16)}, confidence_penalty=0.05, label_smoothing=0.1
    )
    data = DigitsDataModule(size=8, batch_size=64, split=(512, 128, 1157))
    monitor = EntropyMonitor(features="backbone.features", histogram_every_n_steps=3)
    controller = EntropyController("confidence_penalty.coef", target=1.0, kp=0.2, ki=0.05)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    logger = RecordingLogger()
    extra = [CrashAtStep(crash_at)] if crash_at is not None else []
    if signal_at is not None:
        step, signum = signal_at
        extra = [SignalDuringBatch(lambda trainer, _: trainer.global_step == step, signum), InterruptCheckpoint()]
    trainer = make_trainer(
        tmp_path,
        max_epochs=EPOCHS,
        deterministic=True,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[monitor, controller, checkpoint, *extra],
    )
    if crash_at is not None:
        with pytest.raises(Interrupted):
            trainer.fit(model, datamodule=data)
    elif signal_at is not None:
        with pytest.raises(SystemExit) as stopped:  # Lightning's SIGTERMException for SIGTERM
            trainer.fit(model, datamodule=data)
        if signal_at[1] != signal.SIGTERM:
            assert isinstance(stopped.value, TrainingInterrupted) and stopped.value.code == 128 + signal_at[1]
        assert extra[1].saved == tmp_path / name / "last.ckpt"
    else:
        trainer.fit(model, datamodule=data, ckpt_path=resume, weights_only=True)
    return {
        "model": model,
        "optimizer": trainer.optimizers[0].state_dict() if trainer.optimizers else None,
        "controller": controller.state_dict(),
        "monitor": monitor.state_dict(),
        "records": logger.records,
        "last": checkpoint.last_model_path,
    }


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_crashed_and_resumed_fit_equals_the_uninterrupted_fit(tmp_path):
    crash_at = STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2  # in the middle of the second epoch
    full = run(tmp_path, "full")
    crashed = run(tmp_path, "crashed", crash_at=crash_at)
    assert Path(crashed["last"]).name == "last.ckpt"
    # the last checkpoint is at the end of the first epoch: weights_only=True loading must accept it
    resumed = run(tmp_path, "resumed", resume=Path(crashed["last"]))

    assert_identical(full["model"].state_dict(), resumed["model"].state_dict(), "model")
    assert_identical(full["optimizer"], resumed["optimizer"], "optimizer")
    assert_identical(full["controller"], resumed["controller"], "controller")
    assert_identical(full["monitor"], resumed["monitor"], "monitor")
    assert full["controller"]["updates"] == EPOCHS * STEPS_PER_EPOCH

    # every value logged: the crashed run up to the checkpoint, then the resumed run, equals the full run
    first_resumed_step = resumed["records"][0][0]
    assert first_resumed_step == STEPS_PER_EPOCH
    before = [r for r in crashed["records"] if r[0] < first_resumed_step]
    assert before + resumed["records"] == full["records"]
    keys = {k for _, metrics in full["records"] for k in metrics}
    assert {"train/pred_entropy", "val/repr_entropy", "controller/confidence_penalty.coef", "val/acc"} <= keys


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_mid_epoch_writes_the_exact_state_and_the_resumed_fit_equals_the_uninterrupted_fit(tmp_path, signum):
    stop_in = STEPS_PER_EPOCH + 2  # the signal arrives during this step: the checkpoint holds the state after it
    full = run(tmp_path, "full")
    stopped = run(tmp_path, "stopped", signal_at=(stop_in, signum))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    last = tmp_path / "stopped" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop_in + 1
    resumed = run(tmp_path, "resumed", resume=last)

    assert_identical(full["model"].state_dict(), resumed["model"].state_dict(), "model")
    assert_identical(full["optimizer"], resumed["optimizer"], "optimizer")
    assert_identical(full["controller"], resumed["controller"], "controller")
    assert_identical(full["monitor"], resumed["monitor"], "monitor")
    first_resumed_step = resumed["records"][0][0]
    assert first_resumed_step == stop_in + 1
    before = [r for r in stopped["records"] if r[0] < first_resumed_step]

    # every value logged per step, and the epoch values of the other epochs, are the uninterrupted fit's; the
    # interrupted epoch's own aggregates (Lightning's on_epoch means, the epoch's metrics) cover the part after
    # the resume only
    def comparable(records: list) -> list:
        epoch_end = 2 * STEPS_PER_EPOCH - 1
        return [(s, m) for s, m in records if not (s == epoch_end and "train/loss_epoch" in m)]

    assert comparable(before + resumed["records"]) == comparable(full["records"])
    assert len(comparable(full["records"])) == len(full["records"]) - 1
