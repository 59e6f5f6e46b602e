"""The Flow-GRPO reverse SDE, its log-probabilities and entropies, rollout plans and E-GRPO's merging."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from entreg.flow.plans import (
    RolloutPlan,
    Segment,
    branch_plan,
    egrpo_merges,
    egrpo_plans,
    flow_grpo_plan,
    mixgrpo_plan,
    mixgrpo_window_start,
    step_entropies,
)
from entreg.flow.rollout import log_prob_under, ode_states, rollout
from entreg.flow.sampling import time_grid
from entreg.flow.sde import gaussian_kl, sde_mean, sde_sigma, sde_step, step_entropy, transition_log_prob
from tests.flow_toy import MixtureVelocity

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
STD = 0.3
mixture_velocity = MixtureVelocity(MEANS, STD, WEIGHTS).requires_grad_(False)


def grid_list(steps: int, shift: float) -> list[float]:
    return time_grid(steps, shift).tolist()


def mode_fractions(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(torch.cdist(x, MEANS).argmin(1), minlength=len(MEANS)).double() / len(x)


def test_sde_preserves_the_ode_marginals_on_a_2d_mixture():
    """Flow-GRPO's SDE (a = 0.7, every step stochastic) and the ODE transport the same noise distribution to
    the same data distribution: mode weights, means and spreads agree with each other and with the data."""
    n, grid = 20000, grid_list(200, 1.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ode = rollout(mixture_velocity, noise, grid, RolloutPlan(tuple(Segment(i, 1, "ode") for i in range(200))), 0.7)
    sde = rollout(mixture_velocity, noise, grid, flow_grpo_plan(200), 0.7, generator=g)
    assert len(sde.transitions) == 200 and not ode.transitions
    for out in (ode.sample, sde.sample):
        torch.testing.assert_close(mode_fractions(out), WEIGHTS, atol=0.015, rtol=0)
        nearest = MEANS[torch.cdist(out, MEANS).argmin(1)]
        assert abs(float((out - nearest).std()) - STD) < 0.03
    torch.testing.assert_close(ode.sample.mean(0), sde.sample.mean(0), atol=0.05, rtol=0)
    # the SDE really is stochastic: from the same noise its samples differ from the ODE's
    assert float((ode.sample - sde.sample).norm(dim=1).mean()) > 0.3


def test_log_prob_equals_torch_normal_and_reductions():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    step = sde_step(x, v, t=0.8, t_next=0.6, noise_level=0.7, generator=g)
    expected = Normal(step.mean, step.std).log_prob(step.sample)
    torch.testing.assert_close(step.log_prob, expected.mean(dim=(1, 2)))
    torch.testing.assert_close(transition_log_prob(step.sample, step.mean, step.std, "sum"), expected.sum(dim=(1, 2)))
    assert step.std == pytest.approx(sde_sigma(0.8, 0.7) * math.sqrt(0.2))


def test_step_entropy_and_kl_equal_the_gaussian_formulas():
    std = sde_sigma(0.5, 0.7) * math.sqrt(0.1)
    assert step_entropy(sde_sigma(0.5, 0.7), 0.1) == pytest.approx(float(Normal(0.0, std).entropy()))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    expected = kl_divergence(Normal(a, std), Normal(b, std))
    torch.testing.assert_close(gaussian_kl(a, b, std), expected.mean(1))
    torch.testing.assert_close(gaussian_kl(a, b, std, "sum"), expected.sum(1))


def test_sde_mean_is_the_ode_step_without_noise_and_the_t1_clamp():
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(sde_mean(x, v, 0.7, 0.4, sigma=0.0), x - 0.3 * v)
    # at t = 1 sigma uses 1 - t_max (the grid's second level); the drift keeps 1 - t = 0
    assert sde_sigma(1.0, 0.7, t_max=0.9) == pytest.approx(0.7 * math.sqrt(1 / 0.1))
    sigma = sde_sigma(1.0, 0.7, t_max=0.9)
    torch.testing.assert_close(sde_mean(x, v, 1.0, 0.9, sigma), x * (1 - 0.1 * sigma**2 / 2) - 0.1 * v)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sde_sigma(1.0, 0.7), "t_max"),
        (lambda: sde_sigma(0.5, -1.0), "noise_level must be >= 0"),
        (lambda: sde_mean(torch.zeros(1), torch.zeros(1), 0.3, 0.5, 1.0), "t_next < t"),
        (lambda: sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.4, 0.0), "noise_level > 0"),
        (lambda: transition_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), 1.0, "max"), "reduce must be"),
        (lambda: step_entropy(0.0, 0.1), "sigma > 0"),
        (lambda: RolloutPlan((Segment(0, 1, "sde"), Segment(2, 1, "ode"))), "without gaps"),
        (lambda: RolloutPlan((Segment(0, 2, "ode"), Segment(1, 1, "ode"))), "without gaps"),
        (lambda: mixgrpo_plan(8, 6, 4), "window_start"),
        (lambda: branch_plan(8, 7, 2), "length"),
        (lambda: egrpo_merges([1.0, 0.5, 0.6, 0.0], 0.7, 1.0), "decrease strictly"),
        (lambda: egrpo_merges([1.0, 0.5, 0.0], 0.7, 1.0, active_steps=3), "active_steps"),
    ],
)
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_step_entropies_and_egrpo_merges_at_the_paper_settings():
    """16 steps, shift 3, a = 0.7 (E-GRPO's settings, arXiv 2601.00423): exp(h) per step from the closed form
    h = log(sqrt(2 pi e) sigma_t sqrt(dt)) per dimension, rounded to 2 decimals, and the merges tau makes."""
    grid = grid_list(16, 3.0)
    expected = [2.89, 2.99, 2.14, 1.76, 1.54, 1.39, 1.28, 1.19, 1.12, 1.06, 1.00, 0.94, 0.87, 0.80, 0.69, 0.53]
    assert [round(e, 2) for e in step_entropies(grid, 0.7)] == expected
    assert egrpo_merges(grid, 0.7, tau=2.2, active_steps=8) == [(0, 1), (1, 1), (2, 2), (4, 2), (6, 3)]
    released = [(0, 1), (1, 1), (2, 2), (4, 3)]  # VisualGRPO's eta_step_list 0 1 2 4, eta_step_merge_list 1 1 2 3
    assert egrpo_merges(grid, 0.7, tau=2.4, active_steps=7) == released
    low, high = step_entropies(grid, 0.7, length=2)[4], step_entropies(grid, 0.7, length=3)[4]
    assert (round(low, 4), round(high, 4)) == (2.2408, 2.824)  # the tau range (low, high] that gives it
    assert egrpo_merges(grid, 0.7, low, 7) != released and egrpo_merges(grid, 0.7, low + 1e-9, 7) == released
    assert egrpo_merges(grid, 0.7, high, 7) == released and egrpo_merges(grid, 0.7, high + 1e-9, 7) != released
    assert egrpo_merges(grid, 0.7, tau=0.0, active_steps=8) == [(i, 1) for i in range(8)]  # G2RPO
    for start, length in egrpo_merges(grid, 0.7, tau=2.2):  # each merge is the shortest that reaches tau
        sigma = sde_sigma(grid[start], 0.7, grid[1])
        end = start + length
        reached = math.exp(step_entropy(sigma, grid[start] - grid[end])) >= 2.2
        assert reached or end == 16
        if length > 1:
            assert math.exp(step_entropy(sigma, grid[start] - grid[end - 1])) < 2.2
    assert egrpo_merges(grid, 0.7, tau=100.0) == [(0, 16)]  # unreachable: the rest in one step


def test_plans_of_each_variant():
    assert [s.kind for s in flow_grpo_plan(4).segments] == ["sde"] * 4
    mix = mixgrpo_plan(6, window_start=2, window_size=3)
    assert [s.kind for s in mix.segments] == ["ode", "ode", "sde", "sde", "sde", "ode"] and mix.branch == 2
    assert [mixgrpo_window_start(i, 10, 4, 8) for i in (0, 9, 10, 35, 1000)] == [0, 0, 1, 3, 4]
    plans = egrpo_plans(grid_list(16, 3.0), 0.7, tau=2.2, active_steps=8)
    assert [(p.branch, p.sde_segments[0].length, p.nfe) for p in plans] == [
        (0, 1, 16),
        (1, 1, 16),
        (2, 2, 15),
        (4, 2, 15),
        (6, 3, 14),
    ]


def test_after_a_merged_step_the_ode_continues_from_where_it_ended():
    grid = grid_list(16, 3.0)
    called: list[float] = []

    def velocity(x, t, cond):
        called.append(float(t[0]))
        return torch.zeros_like(x)

    out = rollout(velocity, torch.zeros(2, 2, dtype=torch.float64), grid, branch_plan(16, start=4, length=3), 0.7)
    assert called == [grid[i] for i in (0, 1, 2, 3, 4, *range(7, 16))] and out.nfe == 14
    (tr,) = out.transitions
    assert (tr.t, tr.t_next) == (grid[4], grid[7])


def test_branches_from_anchor_states_and_the_ratio_of_the_sampling_policy_is_one():
    """E-GRPO: G branches start from the anchor state at the branch point; recomputing a transition's
    log-probability under the same velocity gives the sampling log-probability (ratio 1) with gradients."""
    grid = grid_list(8, 3.0)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 2, generator=g, dtype=torch.float64)
    anchor = ode_states(mixture_velocity, noise, grid, until=3)
    plan = branch_plan(8, start=3, length=2)
    out = rollout(mixture_velocity, anchor[3].expand(6, 2), grid, plan, 0.7, generator=g, start=3)
    (tr,) = out.transitions
    assert out.nfe == 1 + 3 and torch.equal(tr.x, anchor[3].expand(6, 2))
    assert tr.sample.std(0).min() > 0  # the branches differ
    weight = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    log_prob, mean = log_prob_under(lambda x, t, c: weight * mixture_velocity(x, t), tr, 0.7, grid[1])
    torch.testing.assert_close(log_prob, tr.log_prob)
    torch.testing.assert_close(
        mean,
        sde_mean(tr.x, mixture_velocity(tr.x, torch.full((6,), tr.t)), tr.t, tr.t_next, sde_sigma(tr.t, 0.7, grid[1])),
    )
    log_prob.sum().backward()
    assert weight.grad is not None and weight.grad != 0
    with pytest.raises(ValueError, match="not the start of a segment"):
        rollout(mixture_velocity, anchor[3], grid, plan, 0.7, start=4)
