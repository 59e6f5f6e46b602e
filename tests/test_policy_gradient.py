"""The clipped policy-gradient loss shared by PPO and GRPO: values, gradients and masks against hand-computed
numbers, GRPO's former form bit for bit, the value loss and Schulman's KL estimators."""

from __future__ import annotations

import math

import pytest
import torch

from entreg.flow.grpo import KL_ESTIMATOR
from entreg.policy_gradient import clipped_surrogate_loss, kl_estimate, masked_mean, value_loss


def test_clipped_surrogate_loss_values_gradients_and_mask():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    advantages = torch.tensor([1.0, 1.0, -2.0, -1.0])
    log_prob = ratio.log().requires_grad_()
    out = clipped_surrogate_loss(log_prob, torch.zeros(4), advantages, clip_range=0.2)
    # min(rho A, clip(rho) A): 1.2 (clipped), 0.5, -2.2, -0.8 (clipped)
    assert float(out.loss.detach()) == pytest.approx(-(1.2 + 0.5 - 2.2 - 0.8) / 4)
    assert float(out.clip_fraction) == pytest.approx(0.75)
    kl = sum(float(r) - 1 - math.log(float(r)) for r in ratio) / 4
    assert float(out.approx_kl) == pytest.approx(kl, rel=1e-5)
    out.loss.backward()  # clipped terms have no gradient; the others -rho A / 4
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.125, 0.55, 0.0]))
    mask = torch.tensor([True, True, False, True])
    masked = clipped_surrogate_loss(ratio.log(), torch.zeros(4), advantages, 0.2, mask)
    assert float(masked.loss) == pytest.approx(-(1.2 + 0.5 - 0.8) / 3)


def test_value_loss_plain_and_clipped():
    values, old, returns = torch.tensor([1.0, 2.0]), torch.zeros(2), torch.tensor([0.5, 3.0])
    assert float(value_loss(values, old, returns)) == pytest.approx((0.25 + 1.0) / 2)
    # clipped values 0.5 and 0.5: errors 0 and 6.25; the pessimistic max keeps 0.25 and 6.25
    assert float(value_loss(values, old, returns, clip_range=0.5)) == pytest.approx((0.25 + 6.25) / 2)


def test_grpo_loss_matches_its_definition_and_clips():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    new = torch.tensor([0.0, 0.0, 0.5, -0.5], requires_grad=True)
    out = clipped_surrogate_loss(new, old, adv, clip_range=0.1, kl_estimator=KL_ESTIMATOR)
    ratio = new.detach().exp()
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.1)).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    assert float(out.clip_fraction) == 0.5
    out.loss.backward()
    # the two clipped samples moved in the favoured direction already: no gradient through them
    assert new.grad[2] == 0 and new.grad[3] == 0 and new.grad[0] < 0 and new.grad[1] > 0
    with pytest.raises(ValueError, match="clip_range"):
        clipped_surrogate_loss(new, old, adv, 0.0)


def test_grpo_loss_is_bit_for_bit_its_former_form():
    """GRPO wrote mean(max(-A rho, -A clip(rho))) with approx_kl = mean(log pi_old - log pi): the shared
    -mean(min(rho A, clip(rho) A)) with k1 gives the same bits, gradient included."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(256, generator=g) * 1e-4
    new = (old + torch.randn(256, generator=g) * 1e-4).requires_grad_()
    adv = torch.randn(256, generator=g)
    out = clipped_surrogate_loss(new, old, adv, 1e-4, kl_estimator=KL_ESTIMATOR)
    (grad,) = torch.autograd.grad(out.loss, new)
    twin = new.detach().requires_grad_()
    ratio = torch.exp(twin - old)
    former = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - 1e-4, 1.0 + 1e-4)).mean()
    (former_grad,) = torch.autograd.grad(former, twin)
    assert torch.equal(out.loss.detach(), former.detach()) and torch.equal(grad, former_grad)
    assert torch.equal(out.approx_kl, (old - new.detach()).mean())
    assert torch.equal(out.clip_fraction, ((ratio.detach() - 1.0).abs() > 1e-4).float().mean())


def test_kl_estimators_follow_their_definitions_and_estimate_the_gaussian_kl():
    log_ratio = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(kl_estimate(log_ratio, "k1"), -log_ratio)
    torch.testing.assert_close(kl_estimate(log_ratio, "k2"), log_ratio.square() / 2)
    torch.testing.assert_close(kl_estimate(log_ratio), log_ratio.exp() - 1 - log_ratio)
    # samples of pi_old = N(0, 1), pi = N(0.3, 1): KL(pi_old || pi) = 0.3^2 / 2
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_ratio = torch.distributions.Normal(0.3, 1.0).log_prob(x) - torch.distributions.Normal(0.0, 1.0).log_prob(x)
    for estimator, tolerance in (("k1", 2e-3), ("k2", 5e-3), ("k3", 2e-3)):
        assert float(kl_estimate(log_ratio, estimator).mean()) == pytest.approx(0.045, abs=tolerance), estimator
    assert bool((kl_estimate(log_ratio, "k3") >= 0).all())
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(log_ratio, "k4")  # type: ignore[arg-type]


def test_masked_mean_of_no_entry_is_zero():
    assert float(masked_mean(torch.tensor([1.0, 2.0]), torch.tensor([False, False]))) == 0.0
