"""GaussianMixture: the exact posterior mean against quadrature, its limits, the density against torch's, and the
noise levels of diffusers timesteps."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from entreg.diffusion.gmm import GaussianMixture, scheduler_alpha_sigma, vp_alpha_sigma


def quadrature_posterior_mean(gmm: GaussianMixture, x_t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """E[x0 | x_t] by brute-force quadrature of p(x0) N(x_t; alpha x0, sigma^2 I) on a fine grid (1-D or 2-D)."""
    axes = [torch.linspace(-6, 6, 1201 if gmm.dim == 1 else 401, dtype=torch.float64)] * gmm.dim
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, gmm.dim)
    log_prior = gmm.log_prob(grid)
    log_lik = -((x_t[:, None, :] - alpha * grid[None]) ** 2).sum(-1) / (2 * sigma**2)  # (N, G)
    w = torch.softmax(log_prior[None] + log_lik, dim=1)
    return w @ grid


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize(("alpha", "sigma"), [(0.9, 0.4), (0.5, 0.8)])
def test_posterior_mean_matches_quadrature(dim, alpha, sigma):
    gmm = GaussianMixture.random(dim, components=4, rank=1, seed=3, isotropic=0.3)
    x_t = alpha * gmm.sample(6, torch.Generator().manual_seed(0)) + sigma * torch.randn(6, dim, dtype=torch.float64)
    expected = quadrature_posterior_mean(gmm, x_t, alpha, sigma)
    torch.testing.assert_close(gmm.posterior_mean(x_t, alpha, sigma), expected, rtol=0, atol=2e-4)


def test_per_sample_noise_levels_equal_one_call_per_sample():
    gmm = GaussianMixture.preset("64d")
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    rows = [gmm.posterior_mean(x[i : i + 1], float(alpha[i]), float(sigma[i])) for i in range(5)]
    torch.testing.assert_close(gmm.posterior_mean(x, alpha, sigma), torch.cat(rows))
    eps = torch.cat([gmm.epsilon(x[i : i + 1], float(alpha[i]), float(sigma[i])) for i in range(5)])
    torch.testing.assert_close(gmm.epsilon(x, alpha, sigma), eps)
    torch.testing.assert_close(eps, (x - alpha[:, None] * torch.cat(rows)) / sigma[:, None])


def test_limits_no_noise_returns_x_and_no_signal_returns_the_mixture_mean():
    gmm = GaussianMixture.preset("2d")
    x = gmm.sample(50, torch.Generator().manual_seed(1))
    torch.testing.assert_close(gmm.posterior_mean(x, 1.0, 1e-7), x, rtol=0, atol=1e-6)
    far = 10 * torch.randn(50, 2, dtype=torch.float64)
    torch.testing.assert_close(gmm.posterior_mean(far, 1e-9, 1.0), gmm.mean.expand(50, -1), rtol=0, atol=1e-6)


def test_log_prob_matches_torch_mixture_and_samples_follow_it():
    gmm = GaussianMixture.random(3, components=5, rank=2, seed=1, isotropic=0.2)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(gmm.weights), torch.distributions.MultivariateNormal(gmm.means, gmm.covariances)
    )
    x = gmm.sample(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gmm.log_prob(x), reference.log_prob(x))
    torch.testing.assert_close(x.mean(0), gmm.mean, rtol=0, atol=0.05)  # ~5 standard errors
    second = torch.einsum("k,kde->de", gmm.weights, gmm.covariances + gmm.means[:, :, None] * gmm.means[:, None, :])
    torch.testing.assert_close(torch.cov(x.T), second - torch.outer(gmm.mean, gmm.mean), rtol=0, atol=0.1)
    # the noisy marginal at (alpha, sigma) is the mixture of N(alpha mu_k, alpha^2 S_k + sigma^2 I)
    noisy = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(gmm.weights),
        torch.distributions.MultivariateNormal(0.6 * gmm.means, 0.36 * gmm.covariances + 0.64 * torch.eye(3)),
    )
    torch.testing.assert_close(gmm.log_prob(x, 0.6, 0.8), noisy.log_prob(x))


def test_per_component_isotropic_scales_and_clear_errors():
    gmm = GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.zeros(2, 2, 1), torch.tensor([0.5, 2.0]))
    expected = torch.tensor([[0.25] * 2, [4.0] * 2], dtype=torch.float64)
    torch.testing.assert_close(torch.diagonal(gmm.covariances, dim1=1, dim2=2), expected)
    with pytest.raises(ValueError, match="isotropic must be > 0"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.zeros(2, 2, 1), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match=r"preset must be one of \['2d', '64d'\]"):
        GaussianMixture.preset("3d")
    assert (GaussianMixture.preset("64d").dim, len(GaussianMixture.preset("64d").weights)) == (64, 10)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        vp_alpha_sigma(torch.ones(3), 1.0, "linear")


def test_integer_timesteps_give_the_square_roots_of_alphas_cumprod():
    abar = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    t = torch.tensor([0, 1, 500, 998, 999])
    for interpolation in ("log_sigma", "sigma"):
        alpha, sigma = vp_alpha_sigma(abar, t, interpolation)
        torch.testing.assert_close(alpha, abar[t].double().sqrt())
        torch.testing.assert_close(sigma, (1 - abar[t].double()).sqrt())


def test_non_integer_timesteps_reproduce_the_schedulers_sigmas():
    """log-sigma interpolation inverts _sigma_to_t (sigma-first grids); kappa-linear is Euler's linspace grid."""
    for kwargs, interpolation in (({"use_exponential_sigmas": True}, "log_sigma"), ({}, "sigma")):
        euler = EulerDiscreteScheduler(**kwargs)
        euler.set_timesteps(7)
        assert not torch.equal(euler.timesteps, euler.timesteps.round())  # real-valued timesteps
        alpha, sigma = vp_alpha_sigma(euler.alphas_cumprod, euler.timesteps, interpolation)
        torch.testing.assert_close(sigma / alpha, euler.sigmas[:-1].double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler])
def test_scheduler_alpha_sigma_is_the_noise_level_of_every_step(scheduler_class):
    """The multistep schedulers truncate their timesteps to integers; the step's own sigma is still exact."""
    kwargs = {"timestep_spacing": "trailing"} if scheduler_class is DDIMScheduler else {"use_exponential_sigmas": True}
    scheduler = scheduler_class(**kwargs)
    scheduler.set_timesteps(6)
    x = torch.zeros(1, 2)
    for i, t in enumerate(scheduler.timesteps):
        alpha, sigma = scheduler_alpha_sigma(scheduler, t)
        if scheduler_class is DDIMScheduler:
            torch.testing.assert_close(alpha, scheduler.alphas_cumprod[t].double().sqrt())
        else:
            torch.testing.assert_close(sigma / alpha, scheduler.sigmas[i].double())
        x = scheduler.step(torch.zeros(1, 2), t, x).prev_sample


def test_exact_epsilon_drives_a_scheduler_to_the_mixture():
    gmm = GaussianMixture.preset("2d")
    scheduler = DPMSolverMultistepScheduler(use_exponential_sigmas=True)
    scheduler.set_timesteps(20)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(gmm.epsilon_at(x, t, scheduler.alphas_cumprod), t, x).prev_sample.double()
    truth = gmm.sample(2000, torch.Generator().manual_seed(1))
    assert abs(float(gmm.log_prob(x).mean() - gmm.log_prob(truth).mean())) < 0.15
    assert math.isfinite(float(x.abs().max()))


@pytest.mark.parametrize("sigma", [0.2, 0.6, 0.95])
def test_velocity_is_the_conditional_mean_of_eps_minus_x0(sigma):
    """Flow matching (x_t = (1 - sigma) x_0 + sigma eps): the residual eps - x_0 - v(x_t) is orthogonal to functions
    of x_t (1 and x_t) up to Monte Carlo error, as the conditional mean E[eps - x_0 | x_t] must be; a velocity off
    by 5% fails it."""
    gmm, g = GaussianMixture.preset("2d"), torch.Generator().manual_seed(0)
    x0 = gmm.sample(200_000, generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = (1 - sigma) * x0 + sigma * eps
    target = eps - x0
    residual = target - gmm.velocity(x_t, sigma)
    assert (residual.mean(0).abs() < 4 * residual.std(0) / math.sqrt(len(x_t))).all()
    assert ((residual * x_t).mean(0).abs() < 4 * (residual * x_t).std(0) / math.sqrt(len(x_t))).all()
    wrong = target - 1.05 * gmm.velocity(x_t, sigma)
    assert ((wrong * x_t).mean(0).abs() > 4 * (wrong * x_t).std(0) / math.sqrt(len(x_t))).any()
    model = gmm.velocity_model()  # the pipeline's call: t = 1000 sigma, any float dtype back
    out = model(x_t[:5].float(), torch.tensor(1000.0 * sigma))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), gmm.velocity(x_t[:5].float(), sigma), atol=1e-6, rtol=0)
