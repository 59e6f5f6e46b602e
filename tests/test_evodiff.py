"""EVODiffScheduler: diffusers compatibility, the DPM-Solver++(2M) reduction and clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from entreg.diffusion.evodiff import EVODiffScheduler, projection

NEUTRAL = {"balance": False, "adaptive_ratio": False, "corrector": False, "final_step": "dpmsolver"}


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a network: any fixed function of (x, t) exercises the solvers equally."""
    return torch.tanh(0.7 * x + float(t) / 1000.0) * 0.9


def sample(scheduler, steps: int, shape=(2, 3, 4, 4)) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t), t, x).prev_sample
    return x


def test_from_config_swaps_into_a_pipeline_config_and_round_trips(tmp_path):
    source = DPMSolverMultistepScheduler(prediction_type="v_prediction", timestep_spacing="trailing", beta_end=0.03)
    evo = EVODiffScheduler.from_config(source.config, bounded_zeta=False)
    assert (evo.config.prediction_type, evo.config.timestep_spacing, evo.config.beta_end) == (
        "v_prediction",
        "trailing",
        0.03,
    )
    assert evo.config.bounded_zeta is False and evo.config.balance is True
    evo.save_config(tmp_path)
    again = EVODiffScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in evo.config.items() if not k.startswith("_")
    }
    # any scheduler of a pipeline: keys EVODiff does not know are ignored, the shared ones kept
    ddim = EVODiffScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear").config)
    assert ddim.config.beta_schedule == "scaled_linear"
    back = DPMSolverMultistepScheduler.from_config(evo.config)  # and back again
    assert back.config.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("config", "atol"),
    [
        # epsilon: x0 = (x - sigma eps) / alpha amplifies diffusers' float32 coefficients by 1/alpha ~ 157 at
        # the first step (we compute the coefficients in float64), hence the looser tolerance
        ({}, 1e-3),
        ({"timestep_spacing": "trailing"}, 1e-3),
        ({"use_lu_lambdas": True}, 1e-3),
        ({"use_karras_sigmas": True}, 1e-3),
        ({"prediction_type": "v_prediction"}, 1e-5),
        ({"prediction_type": "sample", "timestep_spacing": "trailing"}, 1e-5),
        ({"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}, 1e-5),
    ],
)
@pytest.mark.parametrize("steps", [3, 8, 25])
def test_neutral_coefficients_reproduce_dpm_solver_2m(config, atol, steps):
    reference = sample(DPMSolverMultistepScheduler(**config), steps)
    ours = sample(EVODiffScheduler(**config, **NEUTRAL), steps)
    torch.testing.assert_close(ours, reference, atol=atol, rtol=0)
    evodiff = sample(EVODiffScheduler(**config), steps)
    assert (evodiff - reference).abs().max() > 10 * atol  # and the EVODiff coefficients do change the result


def test_one_model_evaluation_per_step_and_float64_is_kept():
    scheduler = EVODiffScheduler(use_lu_lambdas=True)
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 10 and scheduler.order == 1
    x = torch.randn(2, 4, dtype=torch.float64)
    out = scheduler.step(toy_model(x, scheduler.timesteps[0]), scheduler.timesteps[0], x).prev_sample
    assert out.dtype == torch.float64


def test_projection_is_the_clipped_least_squares_coefficient_per_channel():
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a = b * torch.tensor([0.5, -1.0, 7.0], dtype=torch.float64)[None, :, None, None]
    torch.testing.assert_close(projection(a, b, True).flatten(), torch.tensor([0.5, -1.0, 2.0] * 2).double())
    per_sample = projection(a, b, False)  # one coefficient per sample: <a, b> / <b, b> over all channels
    expected = (a * b).sum((1, 2, 3)) / (b * b).sum((1, 2, 3))
    torch.testing.assert_close(per_sample.flatten(), expected.clamp(-2, 2))
    assert projection(a, torch.zeros_like(b), True).eq(0).all()  # b = 0: the minimum-norm coefficient, not NaN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_step": "heun"}, "final_step must be"),
        ({"solver_order": 3}, "solver_order must be 2"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type must be 'dpmsolver\\+\\+'"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EVODiffScheduler(**kwargs)


def test_custom_grids_are_checked():
    scheduler = EVODiffScheduler()
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="not both"):
        scheduler.set_timesteps(5, sigmas=[2.0, 1.0, 0.0])
    scheduler.set_timesteps(sigmas=[80.0, 1.0, 0.002])
    assert len(scheduler.timesteps) == 2 and scheduler.sigmas.dtype == torch.float64
    # a grid given by its noise levels gets the timesteps diffusers gives the same levels
    dpm = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    dpm.set_timesteps(12)
    scheduler.set_timesteps(sigmas=dpm.sigmas)
    torch.testing.assert_close(scheduler.timesteps, dpm.timesteps.double(), atol=1e-3, rtol=0)


def test_the_reference_last_step_warns_on_grids_far_from_its_edm_endpoint():
    """The reference's last step multiplies x by 1 - sqrt(s_t s_0) (absolute EDM units): harmless on its own
    grid ending at 0.002; on diffusers' default grid (last level s = 0.34 at 10 steps) it multiplies x by 0.51, at
    5 steps by -0.21."""
    with pytest.warns(UserWarning, match="final_step='dpmsolver'"):
        sample(EVODiffScheduler(), 10)
    edm = torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 11).pow(7)  # the reference's EDM grid, in the same units
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scheduler = EVODiffScheduler()
        scheduler.set_timesteps(sigmas=edm)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * float(edm[0])
        for t in scheduler.timesteps:
            x = scheduler.step(toy_model(x, t), t, x).prev_sample
        sample(EVODiffScheduler(final_step="dpmsolver"), 10)


def exact_rmse(scheduler: EVODiffScheduler, steps: int) -> float:
    """RMSE of 300 samples of an exact 16-D Gaussian mixture denoiser to a 400-step neutral solution."""
    from entreg.diffusion.gmm import GaussianMixture

    mixture = GaussianMixture.random(16, 6, 2, seed=0)
    abar = scheduler.alphas_cumprod.double()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = float(abar[round(float(t))])
        alpha, sigma = a**0.5, (1 - a) ** 0.5
        x64 = x.double()
        return ((x64 - alpha * mixture.posterior_mean(x64, alpha, sigma)) / sigma).to(x.dtype)

    noise = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solutions = []
    for solver, n in ((scheduler, steps), (EVODiffScheduler(**NEUTRAL, timestep_spacing="trailing"), 400)):
        solver.set_timesteps(n)
        x = noise.clone()
        for t in solver.timesteps:
            x = solver.step(eps(x, t), t, x).prev_sample
        solutions.append(x)
    return float((solutions[0] - solutions[1]).pow(2).mean().sqrt())


def test_final_step_guidance_warns_only_where_the_other_choice_is_better():
    """Time-uniform grid ending at 0: the reference's last step shrinks x by 0.51 at 10 steps, the scheduler
    recommends final_step='dpmsolver', and it is more accurate. Grid ending at sigma_min: the balanced
    final_step='dpmsolver' extrapolates over the long last interval, the scheduler warns against it, it is
    far less accurate, and the reference's last step stays silent."""
    zero = {"timestep_spacing": "trailing"}
    positive = {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}
    with pytest.warns(UserWarning, match="final_step='dpmsolver' makes the last step an ordinary one"):
        reference_last = exact_rmse(EVODiffScheduler(**zero), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ordinary_last = exact_rmse(EVODiffScheduler(final_step="dpmsolver", **zero), 10)
        reference_last_positive = exact_rmse(EVODiffScheduler(**positive), 10)
        exact_rmse(EVODiffScheduler(final_step="dpmsolver", balance=False, **positive), 10)
    with pytest.warns(UserWarning, match="use final_step='evodiff'"):
        ordinary_last_positive = exact_rmse(EVODiffScheduler(final_step="dpmsolver", **positive), 10)
    assert ordinary_last < reference_last / 2
    assert ordinary_last_positive > 3 * reference_last_positive
