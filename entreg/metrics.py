"""torchmetrics metrics for entropy: accumulate over batches, synchronise over DDP ranks."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from entreg.distributions import CategoricalFormat, categorical_entropy, categorical_entropy_of

__all__ = ["ClassificationMetrics", "PredictiveEntropy"]

InputFormat = Literal[CategoricalFormat, "entropy"]


class PredictiveEntropy(Metric):
    """Mean, min and max of the per-sample predictive entropy H(softmax(logits)) in nats.

    ``compute()`` returns ``{"mean": ..., "min": ..., "max": ...}``. Under DDP the sums and
    counts are summed and the extremes min/max-reduced across ranks, so the result equals the
    one-process value on the global batch.

    Args:
        input_format: what ``update`` receives: ``"logits"`` (N, C), ``"probs"`` (N, C) or
            per-sample ``"entropy"`` values (N,) computed elsewhere.

    Example:
        >>> metric = PredictiveEntropy()
        >>> metric.update(torch.zeros(4, 10))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'mean': 2.3026, 'min': 2.3026, 'max': 2.3026}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, input_format: InputFormat = "logits", **kwargs) -> None:
        super().__init__(**kwargs)
        if input_format not in ("logits", "probs", "entropy"):
            raise ValueError(f"input_format must be 'logits', 'probs' or 'entropy', got {input_format!r}")
        self.input_format = input_format
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("low", torch.tensor(float("inf")), dist_reduce_fx="min")
        self.add_state("high", torch.tensor(float("-inf")), dist_reduce_fx="max")

    def _entropy(self, preds: Tensor) -> Tensor:
        if self.input_format == "entropy":
            return preds.detach().float().reshape(-1)
        return categorical_entropy_of(preds.detach(), self.input_format)

    def update(self, preds: Tensor) -> None:
        h = self._entropy(preds).reshape(-1)
        if h.numel() == 0:
            return
        self.total += h.sum(dtype=torch.float64)
        self.count += h.numel()
        self.low = torch.minimum(self.low, h.min().to(self.low.dtype))
        self.high = torch.maximum(self.high, h.max().to(self.high.dtype))

    def compute(self) -> dict[str, Tensor]:
        mean = (
            (self.total / self.count).float()
            if self.count > 0
            else torch.tensor(float("nan"), device=self.total.device)
        )
        return {"mean": mean, "min": self.low, "max": self.high}


class ClassificationMetrics(torch.nn.Module):
    """Accuracy, NLL, expected calibration error and predictive entropy of a classifier's logits.

    One instance per stage (Lightning needs separate metric objects for train/val/test).
    ``compute()`` returns ``{"acc", "nll", "ece", "entropy_mean", "entropy_min", "entropy_max"}``,
    synchronised across DDP ranks.

    Args:
        num_classes: number of classes.
        ece_bins: confidence bins of the ECE (L1 norm; 15 is the usual choice).

    Example:
        >>> metrics = ClassificationMetrics(num_classes=3)
        >>> metrics.update(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), torch.tensor([0, 2]))
        >>> round(metrics.compute()["acc"].item(), 2)
        0.5
    """

    def __init__(self, num_classes: int, ece_bins: int = 15) -> None:
        super().__init__()
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1")
        self.nll = MeanMetric()
        self.entropy = PredictiveEntropy(input_format="entropy")

    def update(self, logits: Tensor, target: Tensor, entropy: Tensor | None = None) -> None:
        """Add a batch; pass ``entropy`` (per sample) when it was already computed."""
        logits = logits.detach().float()
        self.acc.update(logits, target)
        self.ece.update(logits.softmax(-1), target)
        self.nll.update(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        self.entropy.update(categorical_entropy(logits) if entropy is None else entropy)

    def compute(self) -> dict[str, Tensor]:
        out = {"acc": self.acc.compute(), "nll": self.nll.compute(), "ece": self.ece.compute()}
        out.update({f"entropy_{k}": v for k, v in self.entropy.compute().items()})
        return out

    def reset(self) -> None:
        for metric in (self.acc, self.ece, self.nll, self.entropy):
            metric.reset()
