"""EATA and ETA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022).

Reference: github.com/mr-eggplant/EATA (``eata.py``, ``main.py``). Samples are kept when their
entropy is below E0 and their probabilities are not redundant with a moving average of the kept
ones (|cos| < d_margin); the loss weights each by exp(E0 - H); EATA adds a Fisher-weighted
anti-forgetting penalty (ETA is EATA without it). No step at all when no sample is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entreg.tta.base import StepInfo, TTAMethod, resolve_margin

__all__ = ["EATA", "ETA", "d_margin_for", "fisher_information"]

Fishers = dict[str, tuple[Tensor, Tensor]]
# (fewest classes, d_margin) as the benchmark configs of mariodoebler/test-time-adaptation@6775997 set EATA's
# D_MARGIN: CIFAR-10-C 0.4 (C = 10), CIFAR-100-C and DomainNet-126 0.1, ImageNet-R/A (C = 200) and ImageNet-C
# (C = 1000, EATA's main.py) 0.05
D_MARGINS: tuple[tuple[int, float], ...] = ((200, 0.05), (100, 0.1), (2, 0.4))


def d_margin_for(num_classes: int) -> float:
    """EATA's redundancy threshold epsilon for ``num_classes`` classes, as the references' configs set
    it: 0.4 below 100 classes (CIFAR-10), 0.1 from 100 to 199 (CIFAR-100, DomainNet-126), 0.05 from 200
    on (ImageNet-R, ImageNet). A confident prediction has |cos| ~ 1/sqrt(C) with a uniform average
    (0.32 for C = 10), so ImageNet's 0.05 rejects every sample of a 10-class stream after the first
    batch; below 7 classes even 0.4 can (pass ``d_margin`` then).

    Example:
        >>> d_margin_for(10), d_margin_for(100), d_margin_for(1000)
        (0.4, 0.1, 0.05)
    """
    return next(margin for fewest, margin in D_MARGINS if num_classes >= fewest)


def fisher_information(
    model: nn.Module, batches: Iterable[Tensor], logits_fn: Callable[[Tensor], Tensor] | None = None
) -> Fishers:
    """Diagonal Fisher information as EATA's ``main.py`` computes it, once, on clean samples: the
    squared gradient of the batch-mean cross-entropy against the model's own predictions, averaged
    over batches, for every parameter that requires a gradient. ``logits_fn`` maps a batch to logits
    (default ``model``). Returns ``{name: (fisher, theta0)}``."""
    logits_fn = logits_fn or model
    sums: dict[str, Tensor] = {}
    count = 0
    for x in batches:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = logits_fn(x)
            F.cross_entropy(logits, logits.argmax(1)).backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                square = param.grad.detach() ** 2
                sums[name] = sums[name] + square if name in sums else square
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("fisher_information needs at least one batch")
    params = dict(model.named_parameters())
    return {name: (total / count, params[name].detach().clone()) for name, total in sums.items()}


class EATA(TTAMethod):
    """Sample-efficient entropy minimisation with an anti-forgetting penalty.

    Args:
        model, num_classes, optimizer, lr, recovery, recovery_threshold: see :class:`TTAMethod`.
        e_margin: entropy threshold E0; default 0.4 ln C, the value of the reference ``main.py``
            (the reference class's own default, ln(1000)/2 - 1, is what you get with
            ``e_margin=math.log(1000) / 2 - 1``).
        d_margin: redundancy threshold epsilon on |cos(m, p)|; ``None`` (default): by the number of
            classes as the references' configs (:func:`d_margin_for`: 0.4 for C < 100, e.g. CIFAR-10;
            0.1 for 100 <= C < 200, CIFAR-100; 0.05 for C >= 200, ImageNet's ``main.py`` value); a
            number is used as given.
        fisher_alpha: beta, weight of the Fisher penalty (2000 in ``main.py``; 0 gives ETA).
        fishers: ``{name: (fisher, theta0)}`` from :func:`fisher_information` (or set later with
            :meth:`set_fishers`); without it the penalty is off.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        ...                           torch.nn.LazyLinear(10))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> eata = EATA(net, num_classes=10, e_margin=2.3)
        >>> eata.d_margin  # by C: 0.4 for 10 classes
        0.4
        >>> eata.set_fishers([torch.randn(8, 3, 8, 8)])
        >>> _, info = eata.adapt(torch.randn(16, 3, 8, 8))
        >>> 0 <= info.selected <= 16
        True
    """

    name = "eata"
    uses_source_data = True
    threshold_args = ("e_margin", "d_margin")

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        e_margin: float | None = None,
        d_margin: float | None = None,
        fisher_alpha: float = 2000.0,
        fishers: Fishers | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model, num_classes, **kwargs)
        self.e_margin = resolve_margin("e_margin", e_margin, num_classes)
        d_margin = d_margin_for(num_classes) if d_margin is None else d_margin
        if not d_margin >= 0:
            raise ValueError(f"d_margin must be >= 0 (None: by the number of classes), got {d_margin}")
        if not fisher_alpha >= 0:
            raise ValueError(f"fisher_alpha must be >= 0, got {fisher_alpha}")
        self.d_margin, self.fisher_alpha = float(d_margin), float(fisher_alpha)
        self.fishers = fishers
        self.model_probs: Tensor | None = None  # moving average m of the kept samples' probabilities

    def prepare(self, batches: Iterable[Tensor]) -> None:
        """:meth:`set_fishers` (the callback's ``source_batches``)."""
        self.set_fishers(batches)

    def set_fishers(self, batches: Iterable[Tensor]) -> None:
        """Compute the Fisher information on clean ``batches`` with the configured model."""
        self.fishers = fisher_information(self.model, batches, self.logits)

    def reset(self) -> None:
        super().reset()
        self.model_probs = None

    def _moving_average(self, probs: Tensor) -> Tensor | None:
        """m <- 0.9 m + 0.1 mean(p) over the kept samples of all ranks (the plain mean the first time)."""
        total = self.all_sum(torch.cat([probs.detach().sum(0), probs.new_tensor([len(probs)])]))
        if total[-1] == 0:
            return self.model_probs
        mean = total[:-1] / total[-1]
        return mean if self.model_probs is None else 0.9 * self.model_probs + 0.1 * mean

    def penalty(self) -> Tensor | None:
        """beta * sum_i F_i (theta_i - theta0_i)^2 over the parameters with a Fisher value."""
        if not self.fishers or self.fisher_alpha == 0:
            return None
        params = dict(self.model.named_parameters())
        terms = [(fisher * (params[name] - theta0) ** 2).sum() for name, (fisher, theta0) in self.fishers.items()]
        return self.fisher_alpha * torch.stack(terms).sum()

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        logits = self.logits(x)
        h = self.entropy(logits)
        reliable = torch.nonzero(h < self.e_margin).flatten()
        h, probs = h[reliable], logits[reliable].softmax(1)
        if self.model_probs is not None:
            cos = F.cosine_similarity(self.model_probs.unsqueeze(0), probs, dim=1)
            diverse = torch.nonzero(cos.abs() < self.d_margin).flatten()
            h, probs, reliable = h[diverse], probs[diverse], reliable[diverse]
        loss, count = self.backward_mean(h * torch.exp(self.e_margin - h.detach()), extra=self.penalty())
        if count:  # the reference takes no step at all (not even the penalty's) when nothing is kept
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.model_probs = self._moving_average(probs)
        mask = self.selection_mask(len(x), reliable)
        return logits, StepInfo(count, len(x), loss if count else None, mask=mask)


class ETA(EATA):
    """EATA without the anti-forgetting penalty (``fisher_alpha = 0``)."""

    name = "eta"
    uses_source_data = False

    def __init__(self, model: nn.Module, num_classes: int, **kwargs) -> None:
        if kwargs.pop("fisher_alpha", 0.0):
            raise ValueError("ETA has no Fisher penalty: use EATA for fisher_alpha > 0")
        super().__init__(model, num_classes, fisher_alpha=0.0, **kwargs)
