"""What a module's ``configure_optimizers`` hands Lightning: its optimizer, with a learning-rate scheduler from a
:data:`~entreg.nn.optim.SchedulerFactory` stepped every optimizer step or every epoch.

Example:
    >>> from functools import partial
    >>> params = [torch.zeros(2, requires_grad=True)]
    >>> cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10)
    >>> config = optimizer_config(torch.optim.SGD(params, lr=0.1), cosine, "step")
    >>> type(config["lr_scheduler"]["scheduler"]).__name__, config["lr_scheduler"]["interval"]
    ('CosineAnnealingLR', 'step')
"""

from __future__ import annotations

from typing import Any

import torch

from entreg.nn.optim import SchedulerFactory

__all__ = ["INTERVALS", "check_interval", "optimizer_config"]

INTERVALS = ("step", "epoch")


def check_interval(interval: str) -> str:
    """``interval`` if it is one of :data:`INTERVALS`, else a ValueError naming them."""
    if interval not in INTERVALS:
        raise ValueError(f"scheduler_interval must be one of {INTERVALS}, got {interval!r}")
    return interval


def optimizer_config(
    optimizer: torch.optim.Optimizer, scheduler: SchedulerFactory | None, interval: str = "epoch"
) -> torch.optim.Optimizer | dict[str, Any]:
    """``optimizer`` alone when ``scheduler`` is None, else Lightning's optimizer configuration with
    ``scheduler(optimizer)`` stepped every ``interval`` (``"step"``: every optimizer step, ``"epoch"``: every
    epoch)."""
    if scheduler is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler(optimizer), "interval": check_interval(interval)},
    }
