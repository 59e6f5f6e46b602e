"""The optimizer and scheduler factories that modules and methods accept, and their defaults.

A factory is what Hydra builds from a config with ``_partial_: true``: ``params -> Optimizer`` or
``optimizer -> LRScheduler``. Every module and method takes an optional factory and names its own default with
:func:`optimizer_or_default`.

Example:
    >>> make = optimizer_or_default(None, torch.optim.SGD, lr=0.1, momentum=0.9)
    >>> make([torch.zeros(2, requires_grad=True)]).defaults["momentum"]
    0.9
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["OptimizerFactory", "SchedulerFactory", "optimizer_or_default"]

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def optimizer_or_default(
    factory: OptimizerFactory | None, default: type[torch.optim.Optimizer], **options: Any
) -> OptimizerFactory:
    """``factory``, or ``params -> default(params, **options)`` when it is None.

    Example:
        >>> adam = optimizer_or_default(None, torch.optim.Adam, lr=3e-4)
        >>> optimizer_or_default(adam, torch.optim.SGD, lr=0.1) is adam  # a given factory wins
        True
    """
    return factory if factory is not None else functools.partial(default, **options)
