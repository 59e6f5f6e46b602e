"""Write to the TensorBoard loggers of a Lightning trainer, whatever other loggers it has."""

from __future__ import annotations

import lightning as L
from torch import Tensor

__all__ = ["has_tensorboard", "log_histogram"]


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
