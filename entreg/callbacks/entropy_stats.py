"""Running entropy statistics that reduce across DDP ranks through the Lightning strategy."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

__all__ = ["EntropyStats"]


class EntropyStats:
    """Sum, count, min and max of per-sample entropies, kept on one device without host syncs.

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
        """Zero the statistics, in new tensors (never shared with another process)."""
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # total, count, nonfinite
        self.extremes = torch.full((2,), float("inf"), dtype=torch.float64, device=self.device)  # -max, min

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.cpu(), "extremes": self.extremes.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums = state["sums"].to(device=self.device, dtype=torch.float64, copy=True)
        self.extremes = state["extremes"].to(device=self.device, dtype=torch.float64, copy=True)

    def update(self, entropy: Tensor) -> None:
        """Add a batch of entropies. No host synchronisation: masks instead of boolean indexing."""
        h = entropy.detach().reshape(-1).to(torch.float64)
        finite = torch.isfinite(h)
        count = finite.sum(dtype=torch.float64)
        self.sums += torch.stack([torch.where(finite, h, 0.0).sum(), count, h.numel() - count])
        inf = h.new_full((), float("inf"))  # a fill on the device, not a host-to-device copy
        low = torch.where(finite, h, inf).amin() if h.numel() else inf
        high = torch.where(finite, h, -inf).amax() if h.numel() else -inf
        self.extremes = torch.minimum(self.extremes, torch.stack([-high, low]))

    def _sums(self, strategy: Strategy | None) -> Tensor:
        sums = self.sums.clone()  # the strategy reduces in place
        if strategy is not None and strategy.world_size > 1:
            sums = strategy.reduce(sums, reduce_op="sum")
        return sums

    def reduced_mean(self, strategy: Strategy | None) -> tuple[Tensor, Tensor]:
        """(mean, count) over all ranks with one collective; mean is NaN when count is 0."""
        sums = self._sums(strategy)
        return sums[0] / sums[1], sums[1]

    def reduced(self, strategy: Strategy | None) -> dict[str, Tensor]:
        """Mean, min, max, count and nonfinite count over all ranks (every rank must call it)."""
        sums, extremes = self._sums(strategy), self.extremes.clone()
        if strategy is not None and strategy.world_size > 1:
            extremes = strategy.reduce(extremes, reduce_op="min")
        return {
            "mean": sums[0] / sums[1],
            "min": extremes[1],
            "max": -extremes[0],
            "count": sums[1],
            "nonfinite": sums[2],
        }
