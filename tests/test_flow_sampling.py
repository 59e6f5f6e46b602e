"""entreg.flow.sampling: the shifted time grid against diffusers, and the Euler ODE on velocities known in
closed form (a point mass, where Euler is exact, and Gaussian data, where the flow is an affine map)."""

from __future__ import annotations

import itertools

import pytest
import torch

from entreg.flow import ode_sample, time_grid


@pytest.mark.parametrize("steps", [1, 4, 16])
@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_time_grid_equals_the_diffusers_flow_match_euler_sigmas(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = time_grid(steps, shift)
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,) and grid[0] == 1 and grid[-1] == 0
    assert bool((grid.diff() < 0).all())
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)  # use_dynamic_shifting=False by default
    scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)])
    torch.testing.assert_close(scheduler.sigmas.double(), grid, atol=1e-6, rtol=0)
    # the default grid of set_timesteps(steps) is another one: it stops at 1/1000 before the final 0
    scheduler.set_timesteps(steps)
    if steps > 1:
        assert not torch.allclose(scheduler.sigmas.double(), grid, atol=1e-4)


def test_ode_sample_takes_the_steps_of_the_diffusers_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(x, t, cond):
        return torch.sin(3 * x) * t[:, None] + cond

    noise, cond = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.randn(6, 2)
    steps, shift = 7, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)])
    x = noise
    for timestep, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1], strict=True):
        x = scheduler.step(velocity(x, sigma.expand(len(x)), cond), timestep, x).prev_sample
    torch.testing.assert_close(ode_sample(velocity, noise, steps, shift, cond), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (3, 1.0), (5, 3.0)])
def test_the_straight_line_to_a_point_is_integrated_exactly(steps, shift):
    # data = the point x0: the exact velocity is (x - x0) / t, constant along the straight lines, so every
    # Euler step is exact and one step from t = 1 lands on x0
    x0 = torch.tensor([1.5, -2.0], dtype=torch.float64)
    noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []

    def velocity(x, t, cond):
        seen.append(t)
        return (x - x0) / t[:, None]

    out = ode_sample(velocity, noise, steps, shift)
    torch.testing.assert_close(out, x0.expand(4, 2), atol=1e-12, rtol=0)
    assert len(seen) == steps and seen[0].shape == (4,) and seen[0].dtype == torch.float64
    torch.testing.assert_close(torch.stack([t[0] for t in seen]), time_grid(steps, shift)[:-1])


def gaussian_velocity(mu: torch.Tensor, s: float):
    """The exact rectified-flow velocity E[eps - x0 | x_t] for data x0 ~ N(mu, s^2 I): with
    var_t = (1 - t)^2 s^2 + t^2, v = (t - (1 - t) s^2) / var_t (x - (1 - t) mu) - mu. Its flow maps the noise z
    to mu + s z (x_t = (1 - t) mu + sqrt(var_t) z)."""

    def velocity(x, t, cond):
        t = t[:, None]
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * mu) - mu

    return velocity


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_ode_transports_noise_to_gaussian_data(shift):
    mu, s = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), 0.5
    velocity = gaussian_velocity(mu, s)
    noise = torch.randn(4000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = mu + s * noise
    errors = [float((ode_sample(velocity, noise, steps, shift) - exact).abs().max()) for steps in (4, 16, 64, 256)]
    # Euler is first order: the worst error over 4,000 points falls about 4x per 4x steps (measured 0.62, 0.17,
    # 0.045, 0.011 at shift 1; 1.12, 0.33, 0.087, 0.022 at shift 3)
    assert all(0.2 * a < b < 0.35 * a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.03, errors
    samples = ode_sample(velocity, noise, 256, shift)
    torch.testing.assert_close(samples.mean(0), mu, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((3,), s, dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    ("steps", "shift", "match"),
    [(0, 1.0, "steps"), (2.5, 1.0, "steps"), (True, 1.0, "steps"), (4, 0.0, "shift"), (4, -1.0, "shift")],
)
def test_invalid_arguments_are_rejected(steps, shift, match):
    with pytest.raises(ValueError, match=match):
        time_grid(steps, shift)
    with pytest.raises(ValueError, match=match):
        ode_sample(lambda x, t, cond: x, torch.zeros(1, 2), steps, shift)
