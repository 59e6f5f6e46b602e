"""Sample-quality metrics for generative models: sliced Wasserstein and Frechet distances (of features too).

Example:
    >>> import torch
    >>> a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    >>> float(sliced_wasserstein(a, a))
    0.0
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FeatureFrechetDistance", "frechet_distance", "sliced_wasserstein"]


def sliced_wasserstein(
    a: Tensor, b: Tensor, projections: int = 512, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced Wasserstein-2 distance between two equal-size point clouds (N, D): the root mean square, over
    ``projections`` random unit directions, of the 1-D W2 distances of the projected samples (sorted)."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (N, D) clouds of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ directions).sort(dim=0)
    pb, _ = (b.double() @ directions).sort(dim=0)
    return (pa - pb).pow(2).mean().sqrt()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to features ``a`` and ``b`` (N, D), as in FID:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


class FeatureFrechetDistance:
    """Frechet distance of samples to fixed real data in the features of a frozen network (FID-style, with any
    extractor, e.g. :func:`entreg.data.digits_nets.digits_feature_extractor`): ``fd(samples) -> float``. The real
    data's features are computed once; inputs go to the extractor as float32 on its device and features are
    flattened per sample.

    Example:
        >>> from torch import nn
        >>> real = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
        >>> fd = FeatureFrechetDistance(nn.Identity(), real)
        >>> round(fd(real), 6), round(fd(real + 1.0), 6)  # a shift by 1 in 4 dimensions: |mu_a - mu_b|^2 = 4
        (0.0, 4.0)
    """

    def __init__(self, extractor: torch.nn.Module, real: Tensor) -> None:
        self.extractor = extractor.eval()
        self.real = self.features(real)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The extractor's features of ``x``, (N, F) on the CPU."""
        device = next(self.extractor.parameters(), x).device  # a parameter-free extractor: the input's
        return self.extractor(x.float().to(device)).flatten(1).cpu()

    def __call__(self, samples: Tensor) -> float:
        return frechet_distance(self.features(samples), self.real)
