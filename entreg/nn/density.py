"""Densities as ``nn.Module``s: :class:`PCAGaussianLikelihood`, a PCA-Gaussian fitted to data, whose
log-density drops on off-manifold samples (the reward-hacking guard of :mod:`entreg.flow.rewards`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PCAGaussianLikelihood"]


class PCAGaussianLikelihood(nn.Module):
    """A PCA-Gaussian density fitted to data: mean ``mu``, the top ``components`` principal directions ``V`` with
    their variances ``lambda_i``, and one isotropic variance ``s2`` (the mean of the discarded eigenvalues, the
    probabilistic-PCA estimate) for everything orthogonal to them:

        log p(x) = -1/2 [sum_i z_i^2 / lambda_i + |r|^2 / s2 + sum_i log lambda_i + (D - k) log s2 + D log 2 pi],

    with ``z = V^T (x - mu)`` and ``r = x - mu - V z``. Off-manifold samples (noise, adversarial perturbations)
    put energy in low-variance directions and score far lower than real data. Variances are floored at
    ``min_variance``. Measured with :func:`entreg.data.digits_nets.digits_pca_likelihood` (16 components), in
    nats per dimension: test digits -0.34 on average (lowest -1.55), uniform noise in [-1, 1] -5.15 (highest
    -3.06), digits pushed toward another class by 20 signed-gradient steps of 0.05 on the mlp
    :func:`entreg.data.digits_nets.digits_classifier` reward -1.26.

    Args:
        data: (N, ...) samples to fit (flattened to (N, D)), e.g. the digits training split.
        components: number of principal components k (1 <= k < D, k < N).
        min_variance: floor of every variance.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> data = torch.randn(500, 2, generator=g) @ torch.tensor([[3.0, 0.0], [0.0, 0.1]])
        >>> model = PCAGaussianLikelihood(data, components=1)
        >>> on, off = model.log_likelihood(torch.tensor([[3.0, 0.0], [0.0, 3.0]])).tolist()
        >>> on > off
        True
    """

    mean: Tensor
    basis: Tensor
    variances: Tensor
    residual_variance: Tensor

    def __init__(self, data: Tensor, components: int = 16, min_variance: float = 1e-6) -> None:
        super().__init__()
        if data.ndim < 2:
            raise ValueError(f"data must be (N, ...) with at least 2 dimensions, got shape {tuple(data.shape)}")
        flat = data.detach().reshape(len(data), -1).double()
        n, d = flat.shape
        if not 1 <= components < min(d, n):
            raise ValueError(f"components must be in [1, min(D, N) = {min(d, n)}), got {components}")
        if not min_variance > 0:
            raise ValueError(f"min_variance must be > 0, got {min_variance}")
        self.components, self.dim = components, d
        mean = flat.mean(0)
        _, singular, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        eigenvalues = singular.square() / (n - 1)  # the len(singular) = min(N, D) non-trivial ones
        residual = eigenvalues[components:].sum() / (d - components)  # the other D - min(N, D) are 0
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", vh[:components].T.contiguous().float())
        self.register_buffer("variances", eigenvalues[:components].clamp_min(min_variance).float())
        self.register_buffer("residual_variance", residual.clamp_min(min_variance).float())

    def log_likelihood(self, samples: Tensor, reduce: str = "mean") -> Tensor:
        """(B,) log-density of every sample: nats per dimension (``reduce="mean"``, the default, comparable
        across data sizes) or the total log-density (``reduce="sum"``, D times larger)."""
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        flat = samples.reshape(len(samples), -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"samples must have {self.dim} values each, got shape {tuple(samples.shape)}")
        centred = flat.to(self.mean.dtype) - self.mean
        z = centred @ self.basis
        residual = centred - z @ self.basis.T
        k = self.components
        total = -0.5 * (
            (z.square() / self.variances).sum(-1)
            + residual.square().sum(-1) / self.residual_variance
            + self.variances.log().sum()
            + (self.dim - k) * self.residual_variance.log()
            + self.dim * math.log(2 * math.pi)
        )
        return total / self.dim if reduce == "mean" else total

    def forward(self, samples: Tensor) -> Tensor:
        return self.log_likelihood(samples)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}"
