"""EVODiffScheduler: diffusers compatibility, the DPM-Solver++(2M) reduction and clear errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from entreg.diffusion import GaussianMixture
from entreg.diffusion.evodiff import EVODiffScheduler, clipped_ratio, inner, pair_gram, reduced_dims, squared_norm

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
    # another scheduler's config: the last step chosen by the grid; an EVODiff config keeps its own
    assert evo.config.final_step == "auto"
    assert (
        EVODiffScheduler.from_config(EVODiffScheduler(final_step="dpmsolver").config).config.final_step == "dpmsolver"
    )
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
        # the last level repeated (Karras with sigma_min): a zero-length last step, the sample stays
        ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 1e-3),
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


def projection(a: torch.Tensor, b: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The least-squares coefficient of a on b as the step computes it: <a, b> / <b, b> clipped to [-2, 2]."""
    return clipped_ratio(inner(a, b, per_channel), squared_norm(b, per_channel))


def test_the_least_squares_coefficient_is_clipped_per_channel():
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a = b * torch.tensor([0.5, -1.0, 7.0], dtype=torch.float64)[None, :, None, None]
    torch.testing.assert_close(projection(a, b, True).flatten(), torch.tensor([0.5, -1.0, 2.0] * 2).double())
    per_sample = projection(a, b, False)  # one coefficient per sample: <a, b> / <b, b> over all channels
    expected = (a * b).sum((1, 2, 3)) / (b * b).sum((1, 2, 3))
    torch.testing.assert_close(per_sample.flatten(), expected.clamp(-2, 2))
    assert projection(a, torch.zeros_like(b), True).eq(0).all()  # b = 0: the minimum-norm coefficient, not NaN


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 6, 6), (2, 16, 6), (1, 4, 2, 3, 3)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_inner_products_by_matrix_product_equal_the_plain_sums(shape, per_channel):
    """inner and pair_gram (batched matrix products) against (a * b).sum over reduced_dims, shaped to broadcast:
    vectors, images, packed 3-D latents (reduced over the token axis per channel) and 5-D video latents."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    dims = reduced_dims(len(shape), per_channel)

    def plain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(dim=dims, keepdim=True)

    torch.testing.assert_close(inner(u, v, per_channel), plain(u, v))
    wanted = (plain(u, u), plain(u, v), plain(v, v))
    for got, want in zip(pair_gram(torch.stack([u, v]), per_channel), wanted, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


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


def diffusers_grid(steps: int, **config) -> torch.Tensor:
    """The noise levels s of ``DPMSolverMultistepScheduler(**config)`` at ``steps`` steps."""
    scheduler = DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


def log_snr_grid(steps: int, end: float, start: float = 80.0) -> torch.Tensor:
    return torch.exp(torch.linspace(math.log(start), math.log(end), steps + 1, dtype=torch.float64))


def exact_run(grid: torch.Tensor, **config) -> tuple[torch.Tensor, list[str]]:
    """300 samples of an exact 16-D Gaussian-mixture denoiser (data prediction at the scheduler's own levels) from
    fixed noise over ``grid``, and the scheduler's warnings."""
    mixture = GaussianMixture.random(16, 6, 2, seed=0)
    scheduler = EVODiffScheduler(prediction_type="sample", **config)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler.set_timesteps(sigmas=grid)
        for k, t in enumerate(scheduler.timesteps):
            s = float(scheduler.sigmas[k])
            alpha = 1 / math.sqrt(1 + s * s)
            x = scheduler.step(mixture.posterior_mean(x, alpha, s * alpha), t, x).prev_sample
    return x, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


RECOMMEND_ORDINARY = "final_step='dpmsolver' makes the last step an ordinary one"
RECOMMEND_REFERENCE = "final_step='evodiff' (the default) is made for it"


@pytest.mark.parametrize(
    ("grid", "better"),
    [
        # the reference's last step multiplies x by 0.51 here (s falls 0.72 -> 0.34, then x = D), a normal-length step
        pytest.param(diffusers_grid(10, timestep_spacing="trailing"), "dpmsolver", id="trailing-to-0"),
        pytest.param(log_snr_grid(10, 0.3), "dpmsolver", id="logSNR-to-0.3"),  # factor 0.60, ends above 0
        # factor 0.87 too, but the last step (8 -> 0.002) is 12x the previous one in logSNR: the reference's rule
        pytest.param(
            torch.cat([torch.linspace(80.0, 0.002, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]),
            "evodiff",
            id="edm-time-uniform-to-0",
        ),
        pytest.param(  # last step 0.34 -> 0.01: 4.7x the previous one
            diffusers_grid(10, timestep_spacing="trailing", final_sigmas_type="sigma_min"),
            "evodiff",
            id="trailing-to-sigma-min",
        ),
        pytest.param(log_snr_grid(10, 0.002), None, id="logSNR-to-0.002"),  # the reference's grid: factor 0.997
    ],
)
def test_final_step_advice_fires_only_where_the_other_choice_is_more_accurate(grid, better):
    """A warning names the other ``final_step`` exactly where it is more accurate (RMSE to a converged solution)."""
    reference_grid = log_snr_grid(800, float(grid[grid > 0][-1]), float(grid[0]))
    if float(grid[-1]) == 0.0:
        reference_grid = torch.cat([reference_grid, torch.zeros(1, dtype=torch.float64)])
    converged, _ = exact_run(reference_grid, **NEUTRAL)
    (reference_last, reference_warns), (ordinary_last, ordinary_warns) = (
        exact_run(grid, final_step=final_step) for final_step in ("evodiff", "dpmsolver")
    )
    rmse_reference = float((reference_last - converged).pow(2).mean().sqrt())
    rmse_ordinary = float((ordinary_last - converged).pow(2).mean().sqrt())
    assert [RECOMMEND_ORDINARY in w for w in reference_warns] == ([True] if better == "dpmsolver" else [])
    assert [RECOMMEND_REFERENCE in w for w in ordinary_warns] == ([True] if better == "evodiff" else [])
    auto_last, auto_warns = exact_run(grid, final_step="auto")  # takes the better one, silently
    assert auto_warns == [] and torch.equal(auto_last, ordinary_last if better == "dpmsolver" else reference_last)
    if better == "dpmsolver":
        assert rmse_ordinary < rmse_reference / 1.5
    elif better == "evodiff":
        assert rmse_reference < rmse_ordinary / 1.5
    else:
        assert 0.5 < rmse_ordinary / rmse_reference < 2.0


def test_neutral_coefficients_differ_from_dpm_solver_only_at_its_first_order_last_step():
    """On a grid ending above 0 diffusers takes the step into the last level at first order below 15 steps
    (``lower_order_final``) or with ``euler_at_final``; neutral EVODiff keeps the second-order step there."""
    positive = {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}
    for config, steps, equal in [
        (positive, 8, False),
        (positive, 14, False),
        (positive, 15, True),
        ({**positive, "lower_order_final": False}, 8, True),
        ({**positive, "euler_at_final": True}, 20, False),
        ({"timestep_spacing": "trailing", "euler_at_final": True}, 8, True),  # ends at 0: x = D either way
    ]:
        diff = sample(EVODiffScheduler(**config, **NEUTRAL), steps) - sample(
            DPMSolverMultistepScheduler(**config), steps
        )
        assert (diff.abs().max() < 1e-3) == equal, (config, steps, float(diff.abs().max()))
