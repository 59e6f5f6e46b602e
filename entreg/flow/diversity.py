"""Sample-diversity metrics for GRPO fine-tuning of flow models: does the policy keep several good answers?

- Mixture toys (the 2-D ring): :func:`nearest_mode` assigns every sample to its closest mode centre;
  :func:`mode_entropy` is the entropy of that assignment (over all modes, or over the target modes only:
  equally rewarded modes should stay evenly used), :func:`in_target_fraction` the share of samples that land on
  a target mode.
- Images (the digits): :func:`mean_pairwise_distance` and :func:`pixel_variance` within each class (the
  "prompt"), averaged over classes; divide a policy's value by the base model's for a ratio.

All take a batch of samples (B, ...) and return Python floats; an undefined value (no sample in the target
modes, no class with two samples) is ``nan``, malformed input raises ``ValueError``.

Example:
    >>> centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    >>> samples = torch.tensor([[0.1, 0.0], [9.9, 0.0], [10.2, 0.0], [0.0, 0.3]])
    >>> round(mode_entropy(samples, centers, normalize=True), 4)  # 2 + 2 samples: an even split
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from entreg.distributions import entropy_from_probs

__all__ = [
    "ModeMetrics",
    "in_target_fraction",
    "mean_pairwise_distance",
    "mode_entropy",
    "nearest_mode",
    "pixel_variance",
]


def _check_modes(samples: Tensor, centers: Tensor, targets: Sequence[int] | None) -> list[int] | None:
    if centers.ndim != 2 or len(centers) == 0:
        raise ValueError(f"centers must be a non-empty (K, D) tensor, got shape {tuple(centers.shape)}")
    if samples.ndim != 2 or samples.shape[1] != centers.shape[1] or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty (B, {centers.shape[1]}) tensor, got {tuple(samples.shape)}")
    if targets is None:
        return None
    targets = [int(t) for t in targets]
    if not targets or min(targets) < 0 or max(targets) >= len(centers) or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct mode indices in [0, {len(centers)}), got {targets}")
    return targets


@torch.no_grad()
def nearest_mode(samples: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """For (B, D) samples and (K, D) mode centres: the index (B,) of every sample's nearest centre and the
    Euclidean distance (B,) to it (its mean is the benchmark's "distance to the nearest mode").

    Example:
        >>> centers = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
        >>> index, distance = nearest_mode(torch.tensor([[0.0, 1.0], [3.0, 0.0]]), centers)
        >>> index.tolist(), distance.tolist()
        ([0, 1], [1.0, 1.0])
    """
    _check_modes(samples, centers, None)
    distance = (samples[:, None, :] - centers.to(samples)).square().sum(-1).sqrt()
    nearest = distance.min(dim=1)
    return nearest.indices, nearest.values


def _mode_counts(samples: Tensor, centers: Tensor, targets: list[int] | None) -> Tensor:
    index, _ = nearest_mode(samples, centers)
    counts = torch.bincount(index, minlength=len(centers)).double()
    return counts if targets is None else counts[targets]


def mode_entropy(
    samples: Tensor, centers: Tensor, targets: Sequence[int] | None = None, normalize: bool = False
) -> float:
    """Entropy (nats) of the share of samples at each mode, every sample assigned to its nearest centre.

    With ``targets``, only the samples whose nearest mode is a target count, and the shares are over the target
    modes (how evenly the policy uses equally rewarded modes); ``nan`` when no sample is at a target.
    ``normalize=True`` divides by ``log`` of the number of modes considered (K, or ``len(targets)``; needs at
    least 2): 1 for an even split, 0 for a collapse onto one mode.

    Example:
        >>> centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
        >>> samples = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 9.0]])
        >>> round(mode_entropy(samples, centers), 4) == round(math.log(3), 4)
        True
        >>> mode_entropy(samples[:2], centers, targets=(0, 2))  # only mode 0 among the targets is used
        0.0
    """
    targets = _check_modes(samples, centers, targets)
    modes = len(centers) if targets is None else len(targets)
    if normalize and modes < 2:
        raise ValueError(f"normalize=True needs at least 2 modes to consider, got {modes}")
    counts = _mode_counts(samples, centers, targets)
    total = counts.sum()
    if total == 0:
        return math.nan
    entropy = max(0.0, entropy_from_probs(counts[counts > 0] / total).item())  # one mode: -(1 log 1) = -0.0
    return entropy / math.log(modes) if normalize else entropy


def in_target_fraction(samples: Tensor, centers: Tensor, targets: Sequence[int]) -> float:
    """The fraction of samples whose nearest mode centre is one of ``targets``.

    Example:
        >>> centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
        >>> in_target_fraction(torch.tensor([[1.0, 0.0], [8.0, 0.0], [9.0, 1.0], [11.0, 0.0]]), centers, [1])
        0.75
    """
    targets = _check_modes(samples, centers, targets)
    return (_mode_counts(samples, centers, targets).sum() / len(samples)).item()


def _class_groups(samples: Tensor, cond: Tensor | None) -> list[Tensor]:
    """Flattened (n, D) groups of samples with at least 2 members: one per class, or the whole batch."""
    if samples.ndim < 2 or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty (B, ...) tensor, got shape {tuple(samples.shape)}")
    flat = samples.reshape(len(samples), -1)
    if cond is None:
        groups = [flat]
    else:
        if cond.shape != (len(samples),):
            raise ValueError(f"cond must hold one class per sample, shape ({len(samples)},), got {tuple(cond.shape)}")
        groups = [flat[cond == c] for c in cond.unique()]
    return [group for group in groups if len(group) >= 2]


@torch.no_grad()
def mean_pairwise_distance(samples: Tensor, cond: Tensor | None = None) -> float:
    """Mean L2 distance over all pairs of distinct samples of a class (each sample flattened), averaged over the
    classes in ``cond`` with at least 2 samples (each class weighs the same); over the whole batch when ``cond``
    is None. ``nan`` when no class has 2 samples.

    Example:
        >>> samples = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
        >>> mean_pairwise_distance(samples, torch.tensor([0, 0, 1, 1]))  # (5 + 0) / 2
        2.5
    """
    groups = _class_groups(samples, cond)
    if not groups:
        return math.nan
    return torch.stack([torch.pdist(group.double()).mean() for group in groups]).mean().item()


@torch.no_grad()
def pixel_variance(samples: Tensor, cond: Tensor | None = None) -> float:
    """Per-pixel (per-coordinate) variance across the samples of a class (unbiased), averaged over pixels, then
    over the classes in ``cond`` with at least 2 samples (the whole batch when ``cond`` is None); ``nan`` when
    no class has 2 samples. ``pixel_variance(policy) / pixel_variance(base)`` is the benchmark's variance ratio.

    Example:
        >>> pixel_variance(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))  # variances 2 and 0
        1.0
    """
    groups = _class_groups(samples, cond)
    if not groups:
        return math.nan
    return torch.stack([group.double().var(dim=0).mean() for group in groups]).mean().item()


class ModeMetrics:
    """``metrics(samples, cond=None) -> {"in_target", "balance", "distance"}`` for a mixture toy: the share of
    samples on a target mode, the normalised entropy of the target modes' shares (1 = even, 0 = one mode) and
    the mean distance to the nearest mode. The ``eval_metrics`` of :class:`entreg.modules.grpo.GRPOModule`.

    Example:
        >>> metrics = ModeMetrics(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), targets=(0, 1))
        >>> metrics(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
        {'in_target': 1.0, 'balance': 1.0, 'distance': 0.0}
    """

    def __init__(self, centers: Tensor, targets: Sequence[int]) -> None:
        self.centers, self.targets = torch.as_tensor(centers), tuple(targets)
        _check_modes(self.centers[:1], self.centers, self.targets)

    def __call__(self, samples: Tensor, cond: Tensor | None = None) -> dict[str, float]:
        centers = self.centers.to(samples.device, samples.dtype)
        return {
            "in_target": in_target_fraction(samples, centers, self.targets),
            "balance": mode_entropy(samples, centers, self.targets, normalize=True),
            "distance": float(nearest_mode(samples, centers)[1].mean()),
        }
