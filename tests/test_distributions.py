"""The distributions: the diagonal Gaussian's log-density in each parameterisation (against torch.distributions
and, bit for bit, the arithmetic its callers always had), the categorical entropy of logits or probabilities,
and the tanh-squashed and truncated Gaussians against torch.distributions and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from entreg.distributions import (
    LOG_SQRT_2PI,
    categorical_entropy,
    categorical_entropy_of,
    entropy_from_probs,
    gaussian_log_prob,
    tanh_gaussian_log_prob,
    truncated_gaussian_sample,
)


def test_gaussian_log_prob_in_every_parameterisation_equals_torch_normal():
    g = torch.Generator().manual_seed(0)
    x, mean, log_std = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    expected = Normal(mean, log_std.exp()).log_prob(x)
    std = log_std.exp()
    for value in (
        gaussian_log_prob(x, mean, log_std, dim=None),
        gaussian_log_prob(x, mean, std=std, dim=None),
        gaussian_log_prob(x, mean, log_std, std=std, dim=None),
    ):
        torch.testing.assert_close(value, expected)
    torch.testing.assert_close(gaussian_log_prob(x, mean, log_std), expected.sum(-1))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std=0.5, dim=(0, 1)), Normal(mean, 0.5).log_prob(x).sum())
    with pytest.raises(ValueError, match="log_std or std"):
        gaussian_log_prob(x, mean)


def test_each_parameterisation_keeps_the_rounding_of_its_callers():
    """PPO and SAC wrote z = (x - mean) exp(-log_std), ERA's truncated Gaussian z = (x - mean) / std, the flow SDE
    torch.distributions' -(x - mean)^2 / (2 std^2): moving them here changed no bit of their log-densities."""
    g = torch.Generator().manual_seed(1)
    x, mean, log_std = (torch.randn(1000, 8, generator=g) for _ in range(3))
    s = torch.exp(log_std)
    policies = -0.5 * ((x - mean) * torch.exp(-log_std)).square() - log_std - LOG_SQRT_2PI
    truncated = -0.5 * ((x - mean) / s).square() - log_std - LOG_SQRT_2PI
    std = torch.tensor(0.3)
    flow = -((x - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI
    assert torch.equal(gaussian_log_prob(x, mean, log_std, dim=None), policies)
    assert torch.equal(gaussian_log_prob(x, mean, log_std, std=s, dim=None), truncated)
    assert torch.equal(gaussian_log_prob(x, mean, std=0.3, dim=None), flow)
    assert not torch.equal(policies, truncated)  # the three roundings do differ


def test_categorical_entropy_of_logits_or_probabilities():
    z = torch.randn(4, 5, 6)
    for dim in (-1, 1):
        expected = categorical_entropy(z, dim=dim)
        torch.testing.assert_close(categorical_entropy_of(z, dim=dim), expected)
        torch.testing.assert_close(categorical_entropy_of(z.softmax(dim), "probs", dim), expected)
        torch.testing.assert_close(entropy_from_probs(z.softmax(dim), dim), expected)
    with pytest.raises(ValueError, match="input_format"):
        categorical_entropy_of(z, "entropy")  # type: ignore[arg-type]


def test_tanh_log_prob_matches_torch_distributions_and_stays_finite_when_saturated():
    from torch.distributions import Normal, TanhTransform, TransformedDistribution

    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64) * 0.5
    u = (mean + log_std.exp() * torch.randn(64, 3, dtype=torch.float64)).clamp(-5, 5)  # where tanh is invertible
    reference = TransformedDistribution(Normal(mean, log_std.exp()), TanhTransform()).log_prob(torch.tanh(u)).sum(-1)
    torch.testing.assert_close(tanh_gaussian_log_prob(u, mean, log_std), reference, rtol=1e-6, atol=1e-6)
    # far in the tails tanh(u) rounds to +-1 and log(1 - tanh^2) would be -inf; ours is exact
    big = torch.tensor([[30.0, -30.0]], requires_grad=True)
    value = tanh_gaussian_log_prob(big, big.detach(), torch.zeros(1, 2))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(big.grad).all()
    assert float(value.detach()) == pytest.approx(2 * (-0.5 * math.log(2 * math.pi) - 2 * (math.log(2) - 30)), rel=1e-6)


def test_truncated_gaussian_matches_scipy_truncnorm():
    stats = pytest.importorskip("scipy.stats")
    centre = torch.tensor([0.0, 0.9, -0.99, 1.0])
    log_std = torch.tensor([0.0, -1.0, -3.0, -0.5])
    n = 20_000
    uniform = torch.rand(n, 4, generator=torch.Generator().manual_seed(0))
    x, log_prob = truncated_gaussian_sample(centre.expand(n, 4), log_std.expand(n, 4), uniform)
    assert bool((x.abs() <= 1).all())
    s = log_std.exp().numpy()
    a, b = (-1 - centre.numpy()) / s, (1 - centre.numpy()) / s
    per_dim = stats.truncnorm.logpdf(x.double().numpy(), a, b, loc=centre.numpy(), scale=s)
    np.testing.assert_allclose(log_prob.double().numpy(), per_dim.sum(1), rtol=1e-4, atol=1e-4)
    for i in range(4):  # the samples follow the truncated law (Kolmogorov-Smirnov)
        test = stats.kstest(x[:, i].double().numpy(), stats.truncnorm(a[i], b[i], loc=centre[i], scale=s[i]).cdf)
        assert test.pvalue > 1e-3
    # reparameterised: finite gradients even at the bound and for a tiny std
    c = torch.tensor([[0.999999, -1.0]], requires_grad=True)
    ls = torch.tensor([[-8.0, -8.0]], requires_grad=True)
    sample, lp = truncated_gaussian_sample(c, ls, torch.tensor([[0.999, 0.5]]))
    (sample.sum() + lp.sum()).backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(ls.grad).all()
