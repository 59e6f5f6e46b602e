"""Collectives through a Lightning strategy that also work in one process (where they do nothing)."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

__all__ = ["all_gather_uneven"]


def all_gather_uneven(strategy: Strategy, values: Tensor) -> Tensor:
    """Concatenate ``values`` of every rank along dim 0 (rank order), even when ranks hold
    different numbers of rows. Every rank must call it; every rank gets the full result.

    ``strategy.all_gather`` needs equal shapes: the rows are padded to the longest rank's count,
    gathered, and the padding is dropped.
    """
    if strategy.world_size == 1:
        return values
    count = torch.tensor([values.shape[0]], device=values.device)
    counts = strategy.all_gather(count).reshape(-1).tolist()
    padded = values.new_zeros((max(counts), *values.shape[1:]))
    padded[: values.shape[0]] = values
    gathered = strategy.all_gather(padded)
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(counts)])
