"""Gaussian mixtures with an exact denoiser: the one data set whose diffusion ODE is known in closed form.

For ``x_t = alpha x_0 + sigma eps`` and ``x_0 ~ sum_k pi_k N(mu_k, S_k)`` the noisy marginal is
``sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)`` and the posterior mean is

    E[x_0 | x_t] = sum_k w_k(x_t) [mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (x_t - alpha mu_k)],

with ``w_k`` the components' posterior weights. With ``S_k = V_k diag(e_k) V_k^T`` every term is
diagonal in the eigenbasis, so one eigendecomposition per component serves every noise level.
Covariances are low rank plus isotropic, ``S_k = U_k U_k^T + s^2 I``, as in the sampler benchmark of
``scripts/bench_samplers.py``.

Example:
    >>> import torch
    >>> gmm = GaussianMixture.random(dim=2, components=3, rank=1, seed=0)
    >>> x0 = gmm.sample(4, torch.Generator().manual_seed(0))
    >>> torch.allclose(gmm.posterior_mean(x0, alpha=1.0, sigma=1e-8), x0)  # no noise: x_0 itself
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """A mixture of Gaussians in float64 with exact sampling, log-density and posterior mean.

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, D).
        factors: (K, D, R) low-rank factors ``U_k``.
        isotropic: ``s``: the covariance of component k is ``U_k U_k^T + s^2 I``.
    """

    def __init__(self, weights: Tensor, means: Tensor, factors: Tensor, isotropic: float) -> None:
        weights, means, factors = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, factors))
        if means.ndim != 2 or factors.ndim != 3 or factors.shape[:2] != means.shape or weights.shape != means.shape[:1]:
            raise ValueError(
                f"expected weights (K,), means (K, D), factors (K, D, R); got {tuple(weights.shape)}, "
                f"{tuple(means.shape)}, {tuple(factors.shape)}"
            )
        if not bool((weights > 0).all()) or not isotropic > 0:
            raise ValueError(f"weights and isotropic must be > 0, got {weights.tolist()} and {isotropic}")
        self.weights = weights / weights.sum()
        self.means, self.factors, self.isotropic = means, factors, float(isotropic)
        eye = torch.eye(means.shape[1], dtype=torch.float64)
        self.covariances = factors @ factors.transpose(1, 2) + self.isotropic**2 * eye
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariances)

    @classmethod
    def random(
        cls, dim: int, components: int, rank: int, seed: int = 0, spread: float = 1.0, scale: float = 0.5
    ) -> GaussianMixture:
        """Weights ~ Dirichlet(2), means ~ spread N(0, I), factors ~ scale N(0, I), s = 0.1 (seeded)."""
        g = torch.Generator().manual_seed(seed)
        weights = -torch.log(torch.rand(components, 2, generator=g, dtype=torch.float64)).sum(1)  # Gamma(2) draws
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        factors = scale * torch.randn(components, dim, rank, generator=g, dtype=torch.float64)
        return cls(weights, means, factors, 0.1)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.factors.shape[2], generator=generator, dtype=torch.float64)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.factors[k] @ z.unsqueeze(-1)).squeeze(-1) + self.isotropic * e

    def _components(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """Log of pi_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I), (N, K), and x's coordinates in each
        eigenbasis divided by the noisy eigenvalues, (K, N, D)."""
        noisy = alpha**2 * self.eigenvalues + sigma**2  # (K, D)
        coords = torch.einsum("nd,kde->kne", x, self.eigenvectors) - alpha * torch.einsum(
            "kd,kde->ke", self.means, self.eigenvectors
        ).unsqueeze(1)
        quad = (coords**2 / noisy.unsqueeze(1)).sum(-1)  # (K, N)
        log_norm = -0.5 * (noisy.log().sum(-1) + self.dim * math.log(2 * math.pi))  # (K,)
        log_p = self.weights.log()[:, None] + log_norm[:, None] - 0.5 * quad
        return log_p.T, coords / noisy.unsqueeze(1)

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """Log-density of ``x`` (N, D) under the mixture (or under its noisy marginal at (alpha, sigma))."""
        log_p, _ = self._components(x.double(), alpha, sigma)
        return torch.logsumexp(log_p, dim=1)

    def posterior_mean(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """E[x_0 | x_t = x] for x_t = alpha x_0 + sigma eps; ``x`` (N, D) in float64."""
        log_p, scaled = self._components(x.double(), alpha, sigma)
        w = torch.softmax(log_p, dim=1)  # (N, K)
        # mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (x - alpha mu_k) in the eigenbasis of S_k
        shrunk = alpha * self.eigenvalues.unsqueeze(1) * scaled  # (K, N, D)
        means = self.means.unsqueeze(1) + torch.einsum("kne,kde->knd", shrunk, self.eigenvectors)
        return torch.einsum("nk,knd->nd", w, means)
