"""Gaussian mixtures with an exact denoiser: the one data set whose diffusion ODE is known in closed form.

For ``x_t = alpha x_0 + sigma eps`` and ``x_0 ~ sum_k pi_k N(mu_k, S_k)`` the noisy marginal is
``sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)`` and the posterior mean is

    E[x_0 | x_t] = sum_k w_k(x_t) [mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (x_t - alpha mu_k)],

with ``w_k`` the components' posterior weights. With ``S_k = V_k diag(e_k) V_k^T`` every term is
diagonal in the eigenbasis, so one eigendecomposition per component serves every noise level.
Covariances are low rank plus isotropic, ``S_k = U_k U_k^T + s_k^2 I`` (``U_k U_k^T`` is the
``U Lambda U^T`` of an orthonormal basis with its scales folded in), as in the sampler benchmark of
``scripts/bench_samplers.py``.

Noise levels of a diffusers schedule at a (possibly non-integer) timestep: :func:`vp_alpha_sigma`; the
noise level a scheduler's next step assumes (exact for any of its grids): :func:`scheduler_alpha_sigma`. Flow
matching (``x_t = (1 - sigma) x_0 + sigma eps``, the SD3/FLUX parametrisation): the exact velocity
``eps - x_0`` (:meth:`GaussianMixture.velocity`, :meth:`GaussianMixture.velocity_model`).

Example:
    >>> import torch
    >>> gmm = GaussianMixture.preset("2d")  # the benchmark's 2-D mixture: 8 components, rank 1
    >>> x0 = gmm.sample(4, torch.Generator().manual_seed(0))
    >>> torch.allclose(gmm.posterior_mean(x0, alpha=1.0, sigma=1e-8), x0)  # no noise: x_0 itself
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "scheduler_alpha_sigma", "vp_alpha_sigma"]

INTERPOLATIONS = ("log_sigma", "sigma")


def vp_alpha_sigma(
    alphas_cumprod: Tensor, timesteps: Tensor | float, interpolation: str = "log_sigma"
) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` of a VP schedule at (possibly non-integer) ``timesteps``, in float64.

    At an integer step ``i`` they are ``sqrt(alphas_cumprod[i])`` and ``sqrt(1 - alphas_cumprod[i])``.
    Between steps, diffusers' noise level ``kappa = sigma / alpha = sqrt((1 - abar) / abar)`` is
    interpolated, then ``alpha = 1 / sqrt(1 + kappa^2)``, ``sigma = kappa alpha``:

    * ``"log_sigma"`` (default): ``log kappa`` linear in ``t``. This is the exact inverse of diffusers'
      ``_sigma_to_t``, which maps every sigma-first grid to the timesteps handed to the model
      (``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_lu_lambdas``,
      ``set_timesteps(sigmas=...)``): evaluated at the real-valued timesteps ``_sigma_to_t`` returns it
      gives back the scheduler's ``sigmas`` (``EulerDiscreteScheduler`` keeps them as float32). The
      multistep schedulers (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``,
      ``DEISMultistepScheduler``, :class:`~entreg.diffusion.EVODiffScheduler`) store their timesteps as
      int64, i.e. rounded or truncated: the model sees that integer step, as a trained network would,
      and no function of ``t`` alone matches their ``sigmas`` there; use :func:`scheduler_alpha_sigma`
      for an exact model.
    * ``"sigma"``: ``kappa`` linear in ``t``: ``np.interp(timesteps, arange(T), sigmas)``, the
      timestep-first direction, which ``EulerDiscreteScheduler`` (``interpolation_type="linear"``)
      uses for its non-integer ``linspace`` timesteps.

    Both agree at integer timesteps, which every other grid uses. Timesteps are clamped to
    ``[0, T - 1]``.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> abar = DDPMScheduler().alphas_cumprod
        >>> alpha, sigma = vp_alpha_sigma(abar, torch.tensor([0, 999]))
        >>> torch.allclose(alpha, abar[[0, 999]].double().sqrt()), torch.allclose(alpha**2 + sigma**2, 1 + 0 * alpha)
        (True, True)
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t = torch.as_tensor(timesteps, dtype=torch.float64, device=abar.device).clamp(0, len(abar) - 1)
    low = t.floor().clamp(max=len(abar) - 2).long()
    frac = t - low
    kappas = ((1 - abar) / abar).sqrt()
    if interpolation == "log_sigma":
        kappa = torch.lerp(kappas.log()[low], kappas.log()[low + 1], frac).exp()
    else:
        kappa = torch.lerp(kappas[low], kappas[low + 1], frac)
    alpha = (1 + kappa**2).rsqrt()
    return alpha, kappa * alpha


def scheduler_alpha_sigma(scheduler: Any, timestep: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(alpha, sigma)`` of the sample a diffusers VP scheduler hands to the model at ``timestep``, float64 0-d.

    Read from the scheduler's ``sigmas`` at the step it is about to take (``step_index``, or the index of
    ``timestep`` before the first step), so a model built on it is exact for the noise levels the solver
    integrates, also where the scheduler stores truncated integer timesteps. Schedulers without
    ``sigmas`` (``DDPMScheduler``, ``DDIMScheduler``) work on integer timesteps: :func:`vp_alpha_sigma`.

    Example:
        >>> from diffusers import DPMSolverMultistepScheduler
        >>> scheduler = DPMSolverMultistepScheduler(use_exponential_sigmas=True)
        >>> scheduler.set_timesteps(5)
        >>> alpha, sigma = scheduler_alpha_sigma(scheduler, scheduler.timesteps[0])
        >>> bool(torch.isclose(sigma / alpha, scheduler.sigmas[0].double()))
        True
    """
    if getattr(scheduler, "sigmas", None) is None or not hasattr(scheduler, "index_for_timestep"):
        return vp_alpha_sigma(scheduler.alphas_cumprod, timestep)
    index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(timestep)
    kappa = scheduler.sigmas[index].double().cpu()
    alpha = (1 + kappa**2).rsqrt()
    return alpha, kappa * alpha


class GaussianMixture:
    """A mixture of Gaussians in float64 with exact sampling, log-density, posterior mean and epsilon.

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, D).
        factors: (K, D, R) low-rank factors ``U_k``.
        isotropic: ``s_k``, one for all components or (K,): the covariance of component k is
            ``U_k U_k^T + s_k^2 I``.

    Every noise level ``alpha``, ``sigma`` below is a float, a 0-d tensor or one value per sample (N,).
    """

    PRESETS: ClassVar[dict[str, tuple[int, int, int]]] = {"2d": (2, 8, 1), "64d": (64, 10, 4)}  # dim, components, rank

    def __init__(self, weights: Tensor, means: Tensor, factors: Tensor, isotropic: float | Tensor) -> None:
        weights, means, factors = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, factors))
        if means.ndim != 2 or factors.ndim != 3 or factors.shape[:2] != means.shape or weights.shape != means.shape[:1]:
            raise ValueError(
                f"expected weights (K,), means (K, D), factors (K, D, R); got {tuple(weights.shape)}, "
                f"{tuple(means.shape)}, {tuple(factors.shape)}"
            )
        isotropic = torch.as_tensor(isotropic, dtype=torch.float64).expand(means.shape[0]).clone()
        if not bool((weights > 0).all()) or not bool((isotropic > 0).all()):
            raise ValueError(f"weights and isotropic must be > 0, got {weights.tolist()} and {isotropic.tolist()}")
        self.weights = weights / weights.sum()
        self.means, self.factors, self.isotropic = means, factors, isotropic
        eye = torch.eye(means.shape[1], dtype=torch.float64)
        self.covariances = factors @ factors.transpose(1, 2) + self.isotropic[:, None, None] ** 2 * eye
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariances)

    @classmethod
    def random(
        cls,
        dim: int,
        components: int,
        rank: int,
        seed: int = 0,
        spread: float = 1.0,
        scale: float = 0.5,
        isotropic: float = 0.1,
    ) -> GaussianMixture:
        """Weights ~ Dirichlet(2), means ~ spread N(0, I), factors ~ scale N(0, I), ``s_k = isotropic`` (seeded)."""
        if min(dim, components, rank) < 1:
            raise ValueError(f"dim, components and rank must be >= 1, got {dim}, {components}, {rank}")
        g = torch.Generator().manual_seed(seed)
        weights = -torch.log(torch.rand(components, 2, generator=g, dtype=torch.float64)).sum(1)  # Gamma(2) draws
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        factors = scale * torch.randn(components, dim, rank, generator=g, dtype=torch.float64)
        return cls(weights, means, factors, isotropic)

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> GaussianMixture:
        """The sampler benchmark's mixtures: ``"2d"`` (8 components, rank 1) or ``"64d"`` (10 components, rank 4)."""
        if name not in cls.PRESETS:
            raise ValueError(f"preset must be one of {sorted(cls.PRESETS)}, got {name!r}")
        dim, components, rank = cls.PRESETS[name]
        return cls.random(dim, components, rank, seed)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        """The mixture's mean, (D,)."""
        return self.weights @ self.means

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples, (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.factors.shape[2], generator=generator, dtype=torch.float64)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.factors[k] @ z.unsqueeze(-1)).squeeze(-1) + self.isotropic[k, None] * e

    @staticmethod
    def _level(value: float | Tensor) -> Tensor:
        """A noise level as (1, N or 1, 1), to broadcast against (K, N, D)."""
        return torch.as_tensor(value, dtype=torch.float64).reshape(1, -1, 1)

    def _components(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log of pi_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I), (N, K); x's coordinates in each
        eigenbasis divided by the noisy eigenvalues, (K, N, D); and alpha as (1, N or 1, 1)."""
        alpha, sigma = self._level(alpha), self._level(sigma)
        noisy = alpha**2 * self.eigenvalues.unsqueeze(1) + sigma**2  # (K, N or 1, D)
        coords = torch.einsum("nd,kde->kne", x, self.eigenvectors) - alpha * torch.einsum(
            "kd,kde->ke", self.means, self.eigenvectors
        ).unsqueeze(1)
        quad = (coords**2 / noisy).sum(-1)  # (K, N)
        log_norm = -0.5 * (noisy.log().sum(-1) + self.dim * math.log(2 * math.pi))  # (K, N or 1)
        log_p = self.weights.log()[:, None] + log_norm - 0.5 * quad
        return log_p.T, coords / noisy, alpha

    def log_prob(self, x: Tensor, alpha: float | Tensor = 1.0, sigma: float | Tensor = 0.0) -> Tensor:
        """Log-density of ``x`` (N, D) under the mixture (or under its noisy marginal at (alpha, sigma)), (N,)."""
        log_p, _, _ = self._components(x.double(), alpha, sigma)
        return torch.logsumexp(log_p, dim=1)

    def posterior_mean(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor) -> Tensor:
        """E[x_0 | x_t = x] for x_t = alpha x_0 + sigma eps; ``x`` (N, D); float64 (N, D)."""
        log_p, scaled, alpha = self._components(x.double(), alpha, sigma)
        w = torch.softmax(log_p, dim=1)  # (N, K)
        # mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1 (x - alpha mu_k) in the eigenbasis of S_k
        shrunk = alpha * self.eigenvalues.unsqueeze(1) * scaled  # (K, N, D)
        means = self.means.unsqueeze(1) + torch.einsum("kne,kde->knd", shrunk, self.eigenvectors)
        return torch.einsum("nk,knd->nd", w, means)

    def epsilon(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor) -> Tensor:
        """The exact noise prediction ``(x_t - alpha E[x_0 | x_t]) / sigma``; float64 (N, D)."""
        x = x.double()
        alpha_, sigma_ = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1) for v in (alpha, sigma))
        return (x - alpha_ * self.posterior_mean(x, alpha, sigma)) / sigma_

    def velocity(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The exact flow-matching velocity ``eps - x_0`` at ``x_t = (1 - sigma) x_0 + sigma eps``:
        ``(x_t - E[x_0 | x_t]) / sigma``; ``x`` (N, D), ``sigma`` > 0; float64 (N, D)."""
        x = x.double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (x - self.posterior_mean(x, 1 - sigma, sigma)) / sigma.reshape(-1, 1)

    def velocity_model(self, num_train_timesteps: int = 1000) -> Callable[[Tensor, Tensor], Tensor]:
        """``model(x, t)``: :meth:`velocity` at ``sigma = t / num_train_timesteps`` (how SD3 and FLUX pipelines and
        ``FlowMatchEulerDiscreteScheduler`` pass the noise level), for samples of any shape (N, ...) flattened to
        the mixture's dimension; computed in float64 and returned in ``x``'s dtype: a flow-matching transformer
        without error.

        Example:
            >>> from diffusers import FlowMatchEulerDiscreteScheduler
            >>> gmm, scheduler = GaussianMixture.preset("2d"), FlowMatchEulerDiscreteScheduler(shift=3.0)
            >>> scheduler.set_timesteps(20)
            >>> x, model = torch.randn(100, 2, generator=torch.Generator().manual_seed(0)), gmm.velocity_model()
            >>> for t in scheduler.timesteps:
            ...     x = scheduler.step(model(x, t), t, x).prev_sample
            >>> bool(gmm.log_prob(x).mean() > gmm.log_prob(torch.randn(100, 2)).mean())
            True
        """

        def model(x: Tensor, t: Tensor) -> Tensor:
            sigma = torch.as_tensor(t, dtype=torch.float64).cpu() / num_train_timesteps
            return self.velocity(x.reshape(len(x), -1), sigma).reshape(x.shape).to(x.dtype)

        return model

    def epsilon_at(
        self, x: Tensor, timesteps: Tensor | float, alphas_cumprod: Tensor, interpolation: str = "log_sigma"
    ) -> Tensor:
        """The exact noise prediction at diffusers timesteps (scalar or (N,)), noise levels from
        :func:`vp_alpha_sigma`: a model ``eps(x, t)`` to run any scheduler with; float64 (N, D).

        Example:
            >>> from diffusers import DPMSolverMultistepScheduler
            >>> gmm, scheduler = GaussianMixture.preset("2d"), DPMSolverMultistepScheduler()
            >>> scheduler.set_timesteps(10)
            >>> x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
            >>> for t in scheduler.timesteps:
            ...     x = scheduler.step(gmm.epsilon_at(x, t, scheduler.alphas_cumprod).float(), t, x).prev_sample
            >>> bool(gmm.log_prob(x).mean() > gmm.log_prob(torch.randn(100, 2)).mean())
            True
        """
        alpha, sigma = vp_alpha_sigma(alphas_cumprod, timesteps, interpolation)
        return self.epsilon(x, alpha, sigma)

    def epsilon_model(self, alphas_cumprod: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """``model(x, t)``: :meth:`epsilon_at` with log-sigma interpolation, computed in float64 and returned in
        ``x``'s dtype, i.e. a noise-prediction network without error that any diffusers scheduler can run.

        Example:
            >>> from diffusers import DDIMScheduler
            >>> model = GaussianMixture.preset("2d").epsilon_model(DDIMScheduler().alphas_cumprod)
            >>> model(torch.zeros(3, 2), torch.tensor(500)).dtype
            torch.float32
        """

        def model(x: Tensor, t: Tensor) -> Tensor:
            return self.epsilon_at(x, t, alphas_cumprod).to(x.dtype)

        return model
