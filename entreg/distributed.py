"""Collectives through a Lightning strategy that also work in one process (where they do nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

if TYPE_CHECKING:
    import lightning as L

__all__ = ["all_gather_uneven", "settle_logged_metrics"]


def settle_logged_metrics(trainer: L.Trainer) -> None:
    """Compute, on every rank, Lightning's epoch-level values of what was logged with ``sync_dist=True``.

    Call it first in any epoch-end hook that runs collectives. At an epoch's end the progress bar,
    enabled on rank 0 only, asks for its metrics, and Lightning then computes, and all-reduces, every
    epoch-level value logged so far; the other ranks do the same reductions later, in the logger's
    epoch end. A collective of ours in between would meet a different one on the other ranks (gloo:
    "Received data size doesn't match expected size"). After this call every rank has done the same
    reductions in the same order (Lightning caches the values, so the progress bar adds none).
    """
    if trainer.world_size > 1:
        trainer.progress_bar_metrics  # noqa: B018 (computes and caches the epoch-level values)


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
