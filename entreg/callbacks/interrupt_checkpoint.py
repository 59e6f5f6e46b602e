"""InterruptCheckpoint: Ctrl-C, SIGTERM or a preemption signal ends a fit with a checkpoint of its exact state."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["InterruptCheckpoint", "TrainingInterrupted"]

SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")


class TrainingInterrupted(SystemExit):
    """A fit stopped by a signal after writing ``ckpt_path``; exits with status 128 + the signal number, as a
    process killed by that signal would."""

    def __init__(self, signum: int, ckpt_path: Path | None) -> None:
        super().__init__(128 + signum)
        self.signal_name, self.ckpt_path = signal.Signals(signum).name, ckpt_path


class InterruptCheckpoint(L.Callback):
    """Stop a fit on Ctrl-C, SIGTERM (schedulers, ``timeout``, ``docker stop``) or SLURM-style preemption signals
    (SIGUSR1/SIGUSR2, e.g. ``sbatch --signal=USR1@90``) at the end of the current training batch, with a checkpoint
    of that exact state, then raise :class:`TrainingInterrupted` (a SIGTERM that Lightning stops on first ends in
    its ``SIGTERMException``, after the same checkpoint; :attr:`saved` holds the path in both cases).

    Lightning alone raises at once on Ctrl-C, mid-step, and writes nothing. Here the signal only sets a flag; at
    the end of the batch (on all DDP ranks together, where Lightning's own ``ModelCheckpoint`` writes) the trainer
    writes ``<dirpath>/<filename>.ckpt``, and the fit stops before the next batch (after logging the batch and any
    validation that was due). The checkpoint holds weights, optimizers, loop progress, every callback's state and
    the module's own (e.g. an RL agent's replay buffer and environment), so a fit resumed from it continues as if
    never stopped. A second Ctrl-C stops at once, without a checkpoint. Lightning stops on SIGTERM itself after a
    training batch or between two validation batches: that state is checkpointed the same way. Signals whose
    handler is not the default (ignored, or Lightning's SLURM requeue handler) are left alone.

    Args:
        dirpath: folder of the checkpoint; default the ``ModelCheckpoint``'s folder, else
            ``<default_root_dir>/checkpoints``.
        filename: file name without ``.ckpt``; ``last`` (default) so that ``ckpt_path=last`` finds it. A
            ``last.ckpt`` symlink (``save_last="link"``) is replaced, not written through.
        signals: the signal names to handle, any of SIGINT, SIGTERM, SIGUSR1, SIGUSR2.

    Example:
        >>> InterruptCheckpoint(signals=["SIGINT", "SIGHUP"])
        Traceback (most recent call last):
        ...
        ValueError: signals must be names among ('SIGINT', 'SIGTERM', 'SIGUSR1', 'SIGUSR2'), got 'SIGHUP'
    """

    def __init__(
        self, dirpath: str | Path | None = None, filename: str = "last", signals: Sequence[str] = SIGNALS
    ) -> None:
        if not filename or "/" in filename or filename.endswith(".ckpt"):
            raise ValueError(f"filename must be a file name without '/' or '.ckpt', got {filename!r}")
        for name in signals:
            if name not in SIGNALS:
                raise ValueError(f"signals must be names among {SIGNALS}, got {name!r}")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename, self.signals = filename, tuple(signals)
        self.requested: int | None = None  # the signal received on this rank
        self.stopping: int | None = None  # the signal the fit stops for (any rank's), once its state is saved
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}

    # ---- signal handling ----------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (no checkpoint of a half-done step)
        self.requested = signum
        if rank_zero_only.rank == 0:
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping at the end of this batch with a checkpoint (Ctrl-C again: stop now)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            if name == "SIGTERM":  # Lightning's handler sets trainer.received_sigterm, read at each batch end
                continue
            signum = getattr(signal, name)
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            if signal.getsignal(signum) is default:
                self._previous[signum] = default
                signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous = {}

    # ---- stopping -----------------------------------------------------------------------------------------------
    def ckpt_path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint is written."""
        folder = self.dirpath
        if folder is None:
            callback = trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / f"{self.filename}.ckpt"

    def _received(self, trainer: L.Trainer) -> int:
        """The signal received on any rank (0: none)."""
        signum = self.requested or (signal.SIGTERM if "SIGTERM" in self.signals and trainer.received_sigterm else 0)
        if trainer.world_size > 1:
            flag = torch.tensor(float(signum), device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return int(signum)

    def _save(self, trainer: L.Trainer) -> Path:
        path = self.ckpt_path(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path
        return path

    def _save_if_requested(self, trainer: L.Trainer) -> None:
        if self.saved is not None:
            return
        signum = self._received(trainer)
        if signum:
            self.stopping = signum
            self._save(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        if self.stopping is None:
            return
        if trainer.is_global_zero:
            name = signal.Signals(self.stopping).name
            progress = getattr(trainer.lightning_module, "training_progress", None)  # e.g. an RL agent's env steps
            where = f"{progress[2]} {progress[0]:,}" if progress is not None else f"step {trainer.global_step}"
            print(f"{name}: stopped after {where}; the exact state is in {self.saved}", file=sys.stderr, flush=True)
        raise TrainingInterrupted(self.stopping, self.saved)

    # ---- hooks --------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested, self.stopping, self.saved = None, None, None
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._save_if_requested(trainer)  # where Lightning's own checkpoints are written; the batch's logs follow

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._stop(trainer)  # the saved batch is complete: logged, validated if due, counted

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self._save_if_requested(trainer)  # a signal after the last batch still ends the command
        self._stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException) and "SIGTERM" in self.signals and self.stopping is None:
            path = self._save(trainer)  # Lightning stopped after a training batch or between validation batches
            if trainer.is_global_zero:
                where = "during validation" if trainer.validating else f"at step {trainer.global_step}"
                print(f"SIGTERM: stopped {where}; the state is in {path}", file=sys.stderr, flush=True)
        elif isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            print("stopped at once (second Ctrl-C or an interrupt outside a fit step): no checkpoint was written",
                  file=sys.stderr, flush=True)  # fmt: skip

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
