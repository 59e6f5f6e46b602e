"""The sampler-benchmark protocol (entreg.diffusion.evaluation) and the feature Frechet distance: what the README's
sampler tables are computed with."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import nn

from entreg.diffusion.evaluation import (
    FLOW_GRIDS,
    SOLVERS,
    converged_flow_solution,
    converged_solution,
    exact_mixture_errors,
    flow_mixture_errors,
    network_model,
    rmse,
    run_solver,
    solver_errors,
    solver_rows,
)
from entreg.diffusion.gmm import GaussianMixture
from entreg.diffusion.metrics import FeatureFrechetDistance, frechet_distance


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.preset("2d")


def test_solver_rows_pair_every_solver_with_its_grids_and_build_fresh_schedulers():
    rows = solver_rows()
    assert "DDIM|trailing" in rows and "DDIM|logSNR" not in rows
    assert len(rows) == 2 * len(SOLVERS) - 1
    first, second = rows["DPM++3M|logSNR"](), rows["DPM++3M|logSNR"]()
    assert first is not second and first.config.solver_order == 3 and first.config.use_exponential_sigmas
    made = []
    rows = solver_rows(["UniPC"], ["linspace"], make=lambda cls, o: made.append((cls, o)), extra_grids={"linspace": {}})
    rows["UniPC|linspace"]()
    assert made == [(SOLVERS["UniPC"][0], {})]


def test_run_solver_takes_one_model_call_per_step_and_refuses_another_count(mixture):
    calls = []
    model = mixture.epsilon_model(DPMSolverMultistepScheduler().alphas_cumprod)
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    x = run_solver(DPMSolverMultistepScheduler(), lambda x, t: calls.append(t) or model(x, t), noise, 7)
    assert len(calls) == 7 and x.shape == noise.shape and x.dtype == torch.float32

    class Short(DDIMScheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            super().set_timesteps(num_inference_steps - 1, device)

    with pytest.raises(RuntimeError, match="took 4 timesteps for NFE 5"):
        run_solver(Short(), model, noise, 5)


def test_run_solver_seeds_stochastic_steps_and_takes_any_count_when_asked(mixture):
    """A stochastic scheduler's steps draw from ``generator`` (same seed, same samples); ``exact_nfe=False`` runs
    a scheduler with more timesteps than the NFE (Heun: two per step but the last)."""
    from diffusers import DDPMScheduler, HeunDiscreteScheduler

    model = mixture.epsilon_model(DDPMScheduler().alphas_cumprod)
    noise = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    seeded = [run_solver(DDPMScheduler(), model, noise, 5, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    calls = []
    run_solver(HeunDiscreteScheduler(), lambda x, t: calls.append(t) or model(x, t), noise, 5, exact_nfe=False)
    assert len(calls) == 2 * 5 - 1


def test_converged_solution_converges_and_solvers_approach_it(mixture):
    model = mixture.epsilon_model(DPMSolverMultistepScheduler().alphas_cumprod)
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = converged_solution(model, noise, 400)
    assert reference.dtype == torch.float64
    assert rmse(reference, converged_solution(model, noise, 200)) < 1e-3
    errors = solver_errors(model, noise, (5, 10, 20), reference, solvers=solver_rows(["DPM++2M"], ["trailing"]))
    assert list(errors) == [f"DPM++2M|trailing|{n}" for n in (5, 10, 20)]
    values = [errors[f"DPM++2M|trailing|{n}"]["rmse"] for n in (5, 10, 20)]
    assert values[0] > values[1] > values[2] > 0


def test_solver_errors_are_nan_for_non_finite_samples_without_calling_the_metrics():
    called = []
    errors = solver_errors(
        lambda x, t: torch.full_like(x, math.nan),
        torch.zeros(4, 2),
        (3,),
        reference=torch.zeros(4, 2),
        metrics={"m": lambda x: called.append(x) or 1.0},
        solvers=solver_rows(["DDIM"], ["trailing"]),
    )
    entry = errors["DDIM|trailing|3"]
    assert entry["nfe"] == 3 and math.isnan(entry["rmse"]) and math.isnan(entry["m"]) and not called


@pytest.mark.filterwarnings("ignore:EVODiff's last step multiplies")
def test_exact_mixture_errors_are_seeded_and_pinned(mixture):
    """The protocol of the README's exact-mixture table on a small setting: deterministic, and these values (the
    published ones come from the same function at 4000 samples, 2000 reference steps, 3 seeds)."""
    settings = {"samples": 300, "seed": 1, "nfes": (5, 10), "reference_steps": 200, "projections": 64}
    rows = solver_rows(["EVODiff", "DPM++2M"], ["trailing"])
    first = exact_mixture_errors(mixture, solvers=rows, **settings)
    assert first == exact_mixture_errors(mixture, solvers=rows, **settings)
    assert first["reference_halving_rmse"] < 2e-3 and first["sw_floor"] < 0.2
    runs = first["runs"]
    assert set(runs) == {f"{row}|{n}" for row in rows for n in (5, 10)}
    assert runs["DPM++2M|trailing|10"]["rmse"] == pytest.approx(0.08210, abs=1e-5)
    assert runs["EVODiff|trailing|10"]["rmse"] == pytest.approx(0.40795, abs=1e-5)
    assert runs["DPM++2M|trailing|10"]["ll"] > runs["EVODiff|trailing|10"]["ll"]


def test_network_model_runs_a_float32_net_for_float64_schedulers():
    seen = []

    class Net(nn.Module):
        def forward(self, x, t):
            seen.append((x.dtype, t.dtype, t.shape, torch.is_grad_enabled(), self.training))
            return x * 0.5

    model = network_model(Net().train())
    out = model(torch.ones(3, 2, dtype=torch.float64), torch.tensor(7))
    assert out.dtype == torch.float64 and torch.equal(out, torch.full((3, 2), 0.5, dtype=torch.float64))
    assert seen == [(torch.float32, torch.float32, (3,), False, False)]


def test_epsilon_model_is_epsilon_at_in_the_inputs_dtype(mixture):
    abar = DPMSolverMultistepScheduler().alphas_cumprod
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.tensor(321.5)
    out = mixture.epsilon_model(abar)(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mixture.epsilon_at(x, t, abar).float(), rtol=0, atol=0)


def test_feature_frechet_distance_is_the_frechet_distance_of_the_features():
    g = torch.Generator().manual_seed(0)
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    real, samples = torch.randn(100, 1, 4, 4, generator=g), torch.randn(80, 1, 4, 4, generator=g) + 0.5
    fd = FeatureFrechetDistance(extractor, real)
    with torch.no_grad():
        expected = frechet_distance(extractor(samples), extractor(real))
    assert fd(samples.double()) == pytest.approx(expected, rel=1e-6)
    assert fd(real) == pytest.approx(0.0, abs=1e-9)


def test_entreg_diffusion_exports_the_evaluation_on_first_use():
    import subprocess
    import sys

    import entreg.diffusion
    from entreg.diffusion import evaluation, metrics

    for module in (evaluation, metrics):
        for name in module.__all__:
            assert name in entreg.diffusion.__all__ and getattr(entreg.diffusion, name) is getattr(module, name)
    code = "import sys, entreg.diffusion; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("grid", ["SD3", "FLUX", "SD3-hand"])
def test_flow_grids_give_every_solver_the_pipelines_grid_and_neutral_evodiff_is_dpm_solver_there(mixture, grid):
    """On each flow grid (SD3's and FLUX's from sigma = 1, DPM-Solver's by hand) the harness runs every solver on the
    same levels, one model call each; with its coefficients neutral EVODiff (from the pipeline's config) equals
    DPM-Solver++ 2M (the grid written into diffusers' scheduler) there, the first step from alpha = 0 included."""
    flow_grid, model = FLOW_GRIDS[grid], mixture.velocity_model()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    neutral = flow_grid.scheduler("EVODiff-f")
    neutral.register_to_config(balance=False, adaptive_ratio=False, corrector=False)
    ours = run_solver(neutral, model, noise, 6, set_timesteps=flow_grid.set_timesteps)
    dpm = flow_grid.scheduler("DPM++2M")
    theirs = run_solver(dpm, model, noise, 6, set_timesteps=flow_grid.set_timesteps)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(dpm.sigmas.double(), neutral.sigmas.double(), atol=1e-6, rtol=0)
    if not flow_grid.hand_set:
        assert float(neutral.sigmas[0]) == 1.0 and torch.equal(neutral.sigmas.double(), flow_grid.sigmas(6))


def test_flow_mixture_errors_converge_and_rank_the_solvers_as_the_readme_says(mixture):
    """The converged flow solution converges; on SD3's grid at NFE 5 EVODiff (the reference's last step, chosen by
    final_step='auto') beats the pipeline's Euler, which beats DPM-Solver++ 2M extrapolating over the long last step
    (README: EVODiff in text-to-image pipelines)."""
    model = mixture.velocity_model()
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = converged_flow_solution(model, noise, 400)
    assert reference.dtype == torch.float64 and rmse(reference, converged_flow_solution(model, noise, 200)) < 2e-3
    out = flow_mixture_errors(mixture, 300, 0, [5, 20], {"SD3": FLOW_GRIDS["SD3"]}, reference_steps=400)
    assert out["seed"] == 0 and out["reference_halving_rmse"] < 2e-3
    runs = {key: value["rmse"] for key, value in out["runs"].items()}
    assert set(runs) == {f"{s}|SD3|{n}" for s in FLOW_GRIDS["SD3"].solvers for n in (5, 20)}
    assert runs["EVODiff|SD3|5"] < runs["FlowMatchEuler|SD3|5"] < runs["DPM++2M|SD3|5"]
    assert runs["EVODiff|SD3|5"] == runs["EVODiff-e|SD3|5"]  # auto takes the reference's last step on this grid
    assert all(runs[f"{s}|SD3|20"] < runs[f"{s}|SD3|5"] for s in ("FlowMatchEuler", "EVODiff", "DPM++2M"))
