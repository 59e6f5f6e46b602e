"""Logging a classifier's :class:`~entreg.metrics.ClassificationMetrics` at the end of an epoch, per stage and per test
dataloader, as :class:`~entreg.modules.ClassificationModule` and :class:`~entreg.modules.PretrainedClassifier` both
name them: ``test/acc``, ``test/nll``, ... and, with several test dataloaders, Lightning's
``test/acc/dataloader_idx_<i>``."""

from __future__ import annotations

import copy

import lightning as L

from entreg.distributed import settle_logged_metrics
from entreg.metrics import ClassificationMetrics

__all__ = ["PerDataloaderMetrics", "log_stage_metrics"]


def log_stage_metrics(
    module: L.LightningModule, metrics: ClassificationMetrics, stage: str, suffix: str = "", error: bool = False
) -> None:
    """Log ``metrics.compute()`` (synchronised over the ranks) as ``<stage>/<name><suffix>``, with ``error`` also
    ``<stage>/error`` = 1 - acc, and reset them; nothing when no rank saw a batch (every batch skipped)."""
    settle_logged_metrics(module.trainer)  # the rank-0 progress bar's reductions come first on every rank
    seen = metrics.entropy.count.clone()
    if module.trainer.world_size > 1:
        seen = module.trainer.strategy.reduce(seen, reduce_op="sum")
    if seen == 0:
        return
    values = metrics.compute()
    if error:
        values["error"] = 1 - values["acc"]
    # compute() already synchronised the values; sync_dist averages identical numbers (exact) and keeps Lightning
    # from warning about unsynchronised epoch-level logging under DDP
    values = {f"{stage}/{name}{suffix}": value for name, value in values.items()}
    module.log_dict(values, sync_dist=True, add_dataloader_idx=False)
    metrics.reset()


class PerDataloaderMetrics:
    """One :class:`~entreg.metrics.ClassificationMetrics` per dataloader of a stage: ``metrics[0]`` is ``first``,
    ``metrics[i]`` a fresh copy of it (same settings and device) made for the first ``count`` dataloaders at once
    and for any other on first use. :meth:`log` logs them all (:func:`log_stage_metrics`), with Lightning's
    ``/dataloader_idx_<i>`` suffixes when there are several, and drops the copies.

    Example:
        >>> import torch
        >>> metrics = PerDataloaderMetrics(ClassificationMetrics(num_classes=2), count=2)
        >>> metrics[1].update(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))
        >>> len(metrics), metrics[0] is metrics.first, int(metrics[0].entropy.count), int(metrics[1].entropy.count)
        (2, True, 0, 1)
    """

    def __init__(self, first: ClassificationMetrics, count: int = 1) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.first = first
        self._more: dict[int, ClassificationMetrics] = {}
        for idx in range(1, count):
            self[idx]

    def __getitem__(self, idx: int) -> ClassificationMetrics:
        if idx == 0:
            return self.first
        if idx not in self._more:
            metrics = copy.deepcopy(self.first)  # same settings and device, fresh states
            metrics.reset()
            self._more[idx] = metrics
        return self._more[idx]

    def __len__(self) -> int:
        return 1 + len(self._more)

    def log(self, module: L.LightningModule, stage: str = "test", error: bool = False) -> None:
        """Log every dataloader's metrics under ``stage`` (``error``: also ``<stage>/error``) and reset them."""
        if not self._more:
            log_stage_metrics(module, self.first, stage, error=error)
            return
        for idx in [0, *sorted(self._more)]:
            log_stage_metrics(module, self[idx], stage, f"/dataloader_idx_{idx}", error)
        self._more.clear()
