"""Running entropy statistics that reduce across DDP ranks through the Lightning strategy."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

__all__ = ["EntropyStats"]


class EntropyStats:
    """Mean, min and max of per-sample entropies, kept on their device without host syncs.

    ``update`` only keeps a reference to the batch's (detached) values: a training step pays about
    a microsecond; the statistics are computed when asked for (once per epoch or logging step).
    Non-finite values (a NaN batch) are left out and counted in ``nonfinite``, so one bad batch
    cannot poison a mean or a controller. :meth:`reduced` gives the statistics over all ranks,
    equal to one process that saw every rank's samples.

    Example:
        >>> stats = EntropyStats(torch.device("cpu"))
        >>> stats.update(torch.tensor([0.5, 1.5, float("nan")]))
        >>> {k: round(float(v), 3) for k, v in stats.reduced(None).items()}
        {'mean': 1.0, 'min': 0.5, 'max': 1.5, 'count': 2.0, 'nonfinite': 1.0}
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._chunks: list[Tensor] = []

    def update(self, entropy: Tensor) -> None:
        self._chunks.append(entropy.detach().reshape(-1))

    def values(self) -> Tensor:
        """Every value seen since the last reset, in order (float64)."""
        if not self._chunks:
            return torch.empty(0, dtype=torch.float64, device=self.device)
        return torch.cat(self._chunks).to(torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._chunks = [state["values"].to(device=self.device, dtype=torch.float64, copy=True)]

    def _sums(self, h: Tensor, strategy: Strategy | None) -> Tensor:
        """(total, count, nonfinite) of the finite values ``h``, summed over ranks."""
        finite = torch.isfinite(h)
        count = finite.sum(dtype=torch.float64)
        sums = torch.stack([torch.where(finite, h, 0.0).sum(), count, h.numel() - count])
        if strategy is not None and strategy.world_size > 1:
            sums = strategy.reduce(sums, reduce_op="sum")
        return sums

    def reduced_mean(self, strategy: Strategy | None) -> tuple[Tensor, Tensor]:
        """(mean, count) over all ranks with one collective; mean is NaN when count is 0."""
        sums = self._sums(self.values(), strategy)
        return sums[0] / sums[1], sums[1]

    def reduced(self, strategy: Strategy | None) -> dict[str, Tensor]:
        """Mean, min, max, count and nonfinite count over all ranks (every rank must call it)."""
        h = self.values()
        sums = self._sums(h, strategy)
        extremes = torch.full((2,), float("inf"), dtype=torch.float64, device=h.device)  # -max, min
        if h.numel():
            finite = torch.isfinite(h)
            extremes = torch.stack(
                [-torch.where(finite, h, -extremes[0]).max(), torch.where(finite, h, extremes[1]).min()]
            )
        if strategy is not None and strategy.world_size > 1:
            extremes = strategy.reduce(extremes, reduce_op="min")
        return {
            "mean": sums[0] / sums[1],
            "min": extremes[1],
            "max": -extremes[0],
            "count": sums[1],
            "nonfinite": sums[2],
        }
