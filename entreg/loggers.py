"""Write to the loggers of a Lightning trainer: histograms to TensorBoard, values at a period of their own."""

from __future__ import annotations

import lightning as L
from torch import Tensor

__all__ = ["has_tensorboard", "log_histogram", "log_metrics", "logging_step", "should_log_step"]


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the values logged in the current training batch (as its
    ``LearningRateMonitor`` does): the number of batches that stepped before this one."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def should_log_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes step values for the training batch about to run (``log_every_n_steps``);
    call it in ``on_train_batch_start``, as Lightning's ``LearningRateMonitor`` does."""
    return trainer._logger_connector.should_update_logs


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Write ``metrics`` to every logger of ``trainer`` on rank zero, bypassing ``self.log``: for
    values produced at a period of their own (``self.log`` would re-send stale values every step)
    and in hooks where ``self.log`` is not allowed (predict)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step if step is None else step)


def _tensorboard_loggers(trainer: L.Trainer) -> list:
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def has_tensorboard(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` logs to TensorBoard (on every rank, so ranks can agree to gather values)."""
    return bool(_tensorboard_loggers(trainer))


def log_histogram(trainer: L.Trainer, tag: str, values: Tensor, step: int | None = None) -> bool:
    """Add a histogram of ``values`` to every TensorBoard logger of ``trainer`` (rank zero only).

    Returns whether a TensorBoard logger was found.
    """
    loggers = _tensorboard_loggers(trainer)
    if trainer.is_global_zero:
        for logger in loggers:
            logger.experiment.add_histogram(
                tag, values.detach().float().cpu(), trainer.global_step if step is None else step
            )
    return bool(loggers)
