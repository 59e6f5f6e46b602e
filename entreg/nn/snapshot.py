"""Undo what a forward pass wrote into a module's buffers (e.g. BatchNorm running statistics)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BufferSnapshot"]


class BufferSnapshot:
    """Keep a copy of a module's buffers so that a bad batch can be undone.

    A batch with NaN/Inf poisons BatchNorm's running statistics during the forward pass, before
    the loss can be checked. ``save()`` before the forward and ``restore()`` when the batch is
    rejected leaves the module exactly as it was. The copies are allocated once and refreshed
    with one fused copy per step.

    Example:
        >>> net = nn.BatchNorm1d(3)
        >>> snapshot = BufferSnapshot(net)
        >>> snapshot.save()
        >>> _ = net(torch.full((4, 3), float("nan")))
        >>> snapshot.restore()
        >>> bool(torch.isfinite(net.running_mean).all())
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._copies: list[torch.Tensor] = []
        self._sources: list[torch.Tensor] = []

    def save(self) -> None:
        buffers = [b for b in self.module.buffers() if b is not None]
        stale = len(buffers) != len(self._copies) or any(
            b.device != c.device or b.dtype != c.dtype or b.shape != c.shape
            for b, c in zip(buffers, self._copies, strict=True)
        )
        if stale:
            self._copies = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._copies, [b.detach() for b in buffers])
        self._sources = buffers

    def restore(self) -> None:
        if not self._sources:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._sources, self._copies)
