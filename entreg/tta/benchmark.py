"""The standard test-time adaptation table: online error per domain and its mean, one row per method.

The online error is the papers' measure: the error of the predictions each step makes *before* its update,
over every sample of a segment in stream order. :class:`OnlineStats` accumulates it from each batch's pre-update
logits, labels and :class:`~entreg.tta.StepInfo` (with diagnostics: entropy, selection, recovery resets,
collapse onto one class, open-set separation) as sums that DDP ranks add up; :class:`BenchmarkTable` holds the
rows and writes them as CSV and JSON. Running a method over a protocol's stream is Lightning's part:
:func:`entreg.callbacks.tta_benchmark.run_benchmark`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from entreg.entropy import categorical_entropy
from entreg.tta.base import StepInfo

__all__ = ["COUNTS", "BenchmarkTable", "OnlineStats", "auroc"]

# the sums of OnlineStats, in the order they are reduced across ranks
COUNTS = (
    "samples",  # every sample seen
    "known",  # samples whose label is a class of the model (0 <= y < C)
    "wrong",  # known samples predicted wrong (pre-update logits)
    "entropy",  # sum of the prediction entropies (nats)
    "below_e0",  # samples with entropy < 0.4 ln C (what EATA/SAR may select)
    "below_tau_ent",  # samples with entropy < 0.5 ln C (DeYO's entropy filter)
    "selected",  # samples in the method's loss
    "selected_known",
    "selected_unknown",
    "recoveries",  # steps that ended in a recovery reset (SAR's model recovery)
    "steps",  # batches of an updating method
    "skipped",  # samples of skipped batches (NaN/Inf inputs)
    "loss",  # sum of the step losses (over steps with one)
    "losses",  # steps with a loss
)


def auroc(known: Tensor, unknown: Tensor) -> float:
    """P(score of a known sample > score of an unknown one), ties counting half (Mann-Whitney U).

    Example:
        >>> auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.8]))
        0.875
    """
    scores = torch.cat([known, unknown]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    values, inverse = scores.unique(return_inverse=True)
    mean_rank = torch.zeros(len(values), dtype=scores.dtype).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(values)).to(scores.dtype)
    ranks = mean_rank[inverse]  # ties share their average rank
    n1, n2 = len(known), len(unknown)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


@dataclass
class OnlineStats:
    """What one segment of a stream gave: sums (:data:`COUNTS`), the number of predictions per class, and, for the
    open set, each sample's max-softmax probability and whether its class is known.

    Example:
        >>> stats = OnlineStats()
        >>> stats.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> stats.result()["error"], stats.result()["top_class_share"]
        (0.5, 0.5)
    """

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0.0))
    predictions: Tensor | None = None
    msp: list[Tensor] = field(default_factory=list)
    known_flags: list[Tensor] = field(default_factory=list)

    def update(
        self,
        logits: Tensor,
        targets: Tensor | None,
        info: StepInfo | None = None,
        updates: bool = True,
        world_size: int = 1,
    ) -> None:
        """Add a batch: its pre-update ``logits`` (N, C), labels (None: unlabelled) and the step's ``info``
        (``updates``: the method trains, so its selection counts; ``world_size``: the number of DDP ranks, each
        adding its own batch: the step's loss, the same on every rank, is counted once over all)."""
        logits = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))  # half -> float, double stays
        classes = logits.shape[1]
        pred = logits.argmax(1)
        h = categorical_entropy(logits, dim=1)
        known = torch.ones_like(pred, dtype=torch.bool) if targets is None else (targets >= 0) & (targets < classes)
        add = {
            "samples": len(pred),
            "entropy": h.sum(),
            "below_e0": (h < 0.4 * math.log(classes)).sum(),
            "below_tau_ent": (h < 0.5 * math.log(classes)).sum(),
        }
        if targets is not None:
            add |= {"known": known.sum(), "wrong": ((pred != targets) & known).sum()}
        if info is not None and updates:  # this rank's selection: info.selected counts every rank's
            selected = info.selected if info.mask is None else info.mask.sum()
            add |= {"selected": selected, "steps": 1, "recoveries": int(info.reset) / world_size}
            if info.loss is not None and math.isfinite(info.loss):
                add |= {"loss": info.loss / world_size, "losses": 1 / world_size}
            if info.mask is not None:
                add |= {"selected_known": (info.mask & known).sum(), "selected_unknown": (info.mask & ~known).sum()}
        for key, value in add.items():
            self.sums[key] += float(value)
        counts = torch.bincount(pred, minlength=classes).cpu()
        self.predictions = counts if self.predictions is None else self.predictions + counts
        self.msp.append(logits.softmax(1).amax(1).cpu())
        self.known_flags.append(known.cpu())

    def skip(self, samples: int) -> None:
        """A batch the adaptation skipped (NaN/Inf inputs): no prediction."""
        self.sums["skipped"] += samples

    def vector(self) -> Tensor:
        """The sums as one float64 tensor (then the class counts), for a sum over ranks."""
        counts = self.predictions if self.predictions is not None else torch.zeros(0)
        return torch.cat([torch.tensor([self.sums[k] for k in COUNTS], dtype=torch.float64), counts.double()])

    def load_vector(self, vector: Tensor) -> None:
        """Replace the sums and class counts with ``vector`` (a :meth:`vector` summed over ranks)."""
        values = vector.double().cpu()
        self.sums = {k: float(v) for k, v in zip(COUNTS, values[: len(COUNTS)].tolist(), strict=True)}
        if len(values) > len(COUNTS):
            self.predictions = values[len(COUNTS) :].round().long()

    def result(self, selected_of: int | None = None) -> dict[str, Any]:
        """The segment's metrics: ``error`` (online error on the known classes; None without labels), ``samples``,
        ``entropy`` (mean, nats), ``below_e0``/``below_tau_ent`` (shares), ``selected`` (share of the samples in
        the loss; None for a method that does not update), ``resets`` (recovery resets), ``mean_loss`` (over the
        steps with a finite loss), ``top_class_share``
        (largest share of one predicted class: collapse), and with samples of unknown classes ``msp_auroc`` and
        ``selected_known``/``selected_unknown``."""
        s = self.sums
        n = s["samples"]
        if not n:
            return {"error": None, "samples": 0}
        out: dict[str, Any] = {
            "error": s["wrong"] / s["known"] if s["known"] else None,
            "samples": int(n),
            "entropy": s["entropy"] / n,
            "below_e0": s["below_e0"] / n,
            "below_tau_ent": s["below_tau_ent"] / n,
            "selected": s["selected"] / n if s["steps"] else None,
            "resets": round(s["recoveries"]),
            "mean_loss": s["loss"] / s["losses"] if s["losses"] else None,
            "top_class_share": float(self.predictions.max()) / n,
        }
        if s["skipped"]:
            out["skipped"] = int(s["skipped"])
        if s["known"] < n:  # open set
            flags, scores = torch.cat(self.known_flags), torch.cat(self.msp)
            if bool(flags.any()) and bool((~flags).any()):
                out["msp_auroc"] = auroc(scores[flags], scores[~flags])
            if s["steps"]:
                out["selected_known"] = s["selected_known"] / s["known"] if s["known"] else None
                out["selected_unknown"] = s["selected_unknown"] / (n - s["known"])
        return out


Row = dict[str, dict[str, Any]]  # segment name -> metrics of :meth:`OnlineStats.result`


@dataclass
class BenchmarkTable:
    """Rows (a label: a method and its settings) of per-segment metrics, and what every row has in common.

    Example:
        >>> table = BenchmarkTable(["gauss", "fog"])
        >>> table.add("source", {"gauss": {"error": 0.5}, "fog": {"error": 0.25}})
        >>> table.mean_error("source"), table.header()
        (0.375, ['method', 'gauss', 'fog', 'mean'])
    """

    segments: list[str]
    rows: dict[str, Row] = field(default_factory=dict)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # per row: images/s, clean error after...
    info: dict[str, Any] = field(default_factory=dict)  # the run's settings

    def add(self, label: str, row: Row, **extra: Any) -> None:
        if list(row) != self.segments:
            raise ValueError(f"row {label!r} has segments {list(row)}, the table {self.segments}")
        self.rows[label], self.extra[label] = row, extra

    def errors(self, label: str) -> list[float | None]:
        return [self.rows[label][s].get("error") for s in self.segments]

    def mean_error(self, label: str) -> float | None:
        """The mean over segments of the online error (None if a segment has none)."""
        errors = self.errors(label)
        return None if not errors or None in errors else statistics.fmean(errors)

    def header(self) -> list[str]:
        return ["method", *self.segments, "mean"]

    def error_rows(self, scale: float = 100.0) -> list[list[Any]]:
        """``[label, error per segment..., mean]``, errors times ``scale`` (percent by default)."""

        def scaled(value: float | None) -> float | None:
            return None if value is None else scale * value

        return [[label, *map(scaled, self.errors(label)), scaled(self.mean_error(label))] for label in self.rows]

    def scalars(self, prefix: str = "benchmark") -> dict[str, float]:
        """``{prefix}/{row}/{segment}/error`` and ``{prefix}/{row}/mean_error`` (fractions), for loggers (no prefix
        for ``prefix=""``)."""
        prefix = f"{prefix}/" if prefix else ""
        out = {}
        for label in self.rows:
            for segment, error in zip(self.segments, self.errors(label), strict=True):
                if error is not None:
                    out[f"{prefix}{label}/{segment}/error"] = error
            if (mean := self.mean_error(label)) is not None:
                out[f"{prefix}{label}/mean_error"] = mean
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "segments": self.segments,
            "error_percent": {row[0]: dict(zip(self.header()[1:], row[1:], strict=True)) for row in self.error_rows()},
            "rows": self.rows,
            "extra": self.extra,
            "info": self.info,
        }

    def write(self, folder: str | Path, name: str = "tta_table") -> dict[str, Path]:
        """Write ``<name>.csv`` (online error in % per segment and the mean, one row per method) and ``<name>.json``
        (everything) to ``folder``; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"csv": folder / f"{name}.csv", "json": folder / f"{name}.json"}
        with paths["csv"].open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(self.header())
            for row in self.error_rows():
                writer.writerow([row[0], *("" if v is None else f"{v:.2f}" for v in row[1:])])
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, default=float) + "\n")
        return paths

    def format(self, digits: int = 1, short: Callable[[str], str] | None = None) -> str:
        """The error table in %, as text (``short`` abbreviates segment names)."""
        short = short or (lambda name: name)
        header = ["method", *map(short, self.segments), "mean"]
        cells = [[str(r[0]), *("-" if v is None else f"{v:.{digits}f}" for v in r[1:])] for r in self.error_rows()]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        lines = [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in [header, *cells]]  # fmt: skip
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)
