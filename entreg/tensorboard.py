"""Write to the TensorBoard loggers of a Lightning trainer, whatever other loggers it has."""

from __future__ import annotations

import lightning as L
from torch import Tensor

__all__ = ["log_histogram"]


def log_histogram(trainer: L.Trainer, tag: str, values: Tensor, step: int | None = None) -> bool:
    """Add a histogram of ``values`` to every TensorBoard logger of ``trainer`` (rank zero only).

    Returns whether a TensorBoard logger was found.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if trainer.is_global_zero:
        for logger in loggers:
            logger.experiment.add_histogram(
                tag, values.detach().float().cpu(), trainer.global_step if step is None else step
            )
    return bool(loggers)
