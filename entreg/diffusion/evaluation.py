"""Solver error of diffusion samplers: diffusers' solvers and EVODiff run on one model from the same noise at each
number of model evaluations (NFE), scored by their RMSE to a converged solution of the same ODE and by sample
metrics.

On an exact Gaussian mixture (:func:`exact_mixture_errors`) the model has no error, so the RMSE is the solver's
alone; on a trained network (:func:`network_model`) it is the solver's error on that network's ODE. This is the
protocol of ``scripts/bench_samplers.py`` and ``scripts/bench_samplers_learned.py`` (the README's sampler tables).

Example:
    >>> from entreg.diffusion.gmm import GaussianMixture
    >>> errors = exact_mixture_errors(GaussianMixture.preset("2d"), 200, seed=0, nfes=(5, 10), reference_steps=100,
    ...                               solvers=solver_rows(["DPM++2M"], ["trailing"]))
    >>> errors["runs"]["DPM++2M|trailing|10"]["rmse"] < errors["runs"]["DPM++2M|trailing|5"]["rmse"]
    True
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor, nn

from entreg.diffusion.evodiff import EVODiffScheduler
from entreg.diffusion.gmm import GaussianMixture
from entreg.diffusion.metrics import sliced_wasserstein

__all__ = [
    "GRIDS",
    "LOGSNR_SOLVERS",
    "SOLVERS",
    "converged_solution",
    "exact_mixture_errors",
    "network_model",
    "rmse",
    "run_solver",
    "solver_errors",
    "solver_rows",
]

Model = Callable[[Tensor, Tensor], Tensor]
Metric = Callable[[Tensor], float]
SchedulerFactory = Callable[[type, dict[str, Any]], Any]

# name -> scheduler class and the options that differ from its defaults
SOLVERS: dict[str, tuple[type, dict[str, Any]]] = {
    "EVODiff": (EVODiffScheduler, {}),
    "EVODiff-f": (EVODiffScheduler, {"final_step": "dpmsolver"}),
    "DPM++2M": (DPMSolverMultistepScheduler, {"solver_order": 2}),
    "DPM++3M": (DPMSolverMultistepScheduler, {"solver_order": 3}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
    "DDIM": (DDIMScheduler, {"clip_sample": False}),  # its default clips x0 to [-1, 1]
    "Euler": (EulerDiscreteScheduler, {}),
}
# timestep grids: trailing spacing, and uniform in log sigma (logSNR for VP); DDIM has no logSNR option
GRIDS: dict[str, dict[str, Any]] = {
    "trailing": {"timestep_spacing": "trailing"},
    "logSNR": {"use_exponential_sigmas": True},
}
LOGSNR_SOLVERS = frozenset(SOLVERS) - {"DDIM"}


def solver_rows(
    solvers: Iterable[str] = tuple(SOLVERS),
    grids: Iterable[str] = tuple(GRIDS),
    make: SchedulerFactory | None = None,
    extra_grids: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Callable[[], Any]]:
    """``"solver|grid"`` -> a function returning a fresh scheduler, solvers outer and grids inner, each solver on the
    grids it has (DDIM on no logSNR grid). ``make(cls, options)`` builds a scheduler (default ``cls(**options)``;
    e.g. ``lambda cls, o: module.make_scheduler(f"{cls.__module__}.{cls.__name__}", **o)`` for a trained
    :class:`~entreg.modules.diffusion.DiffusionModule`'s noise schedule and prediction type); ``extra_grids`` adds
    grids to :data:`GRIDS` (``{"linspace": {}}``: diffusers' default spacing)."""
    grid_options = {**GRIDS, **(extra_grids or {})}
    make = make or (lambda cls, options: cls(**options))
    rows = {}
    for solver in solvers:
        cls, options = SOLVERS[solver]
        for grid in grids:
            if grid == "logSNR" and solver not in LOGSNR_SOLVERS:
                continue
            rows[f"{solver}|{grid}"] = partial(make, cls, {**options, **grid_options[grid]})
    return rows


def run_solver(
    scheduler: Any,
    model: Model,
    noise: Tensor,
    nfe: int,
    generator: torch.Generator | None = None,
    exact_nfe: bool = True,
) -> Tensor:
    """Samples of ``scheduler`` in ``nfe`` timesteps (on ``noise``'s device), one ``model(x, t)`` call each, from
    ``noise`` (scaled by the scheduler's ``init_noise_sigma``); ``generator`` seeds the steps of stochastic
    schedulers (those whose ``step`` takes one). Raises if the scheduler takes another number of timesteps, unless
    ``exact_nfe=False`` (e.g. Heun's two per step)."""
    scheduler.set_timesteps(nfe, device=noise.device)
    if exact_nfe and len(scheduler.timesteps) != nfe:
        raise RuntimeError(f"{type(scheduler).__name__} took {len(scheduler.timesteps)} timesteps for NFE {nfe}")
    x = noise * scheduler.init_noise_sigma
    takes_generator = generator is not None and "generator" in inspect.signature(scheduler.step).parameters
    step_options = {"generator": generator} if takes_generator else {}
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_options).prev_sample
    return x


def converged_solution(model: Model, noise: Tensor, steps: int) -> Tensor:
    """The reference solution: DPM-Solver++(2M) (:class:`EVODiffScheduler` with its coefficients neutral) on
    ``steps`` levels uniform in logSNR from the largest to the smallest noise level of diffusers' default VP
    schedule, then the data prediction, in float64 from ``noise``."""
    scheduler = EVODiffScheduler(balance=False, adaptive_ratio=False, corrector=False, final_step="dpmsolver")
    abar = scheduler.alphas_cumprod.double()
    kappas = ((1 - abar) / abar).sqrt()
    grid = torch.exp(torch.linspace(math.log(kappas[-1]), math.log(kappas[0]), steps, dtype=torch.float64))
    scheduler.set_timesteps(sigmas=torch.cat([grid, torch.zeros(1, dtype=torch.float64)]))
    x = noise.double()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def rmse(a: Tensor, b: Tensor) -> float:
    """Root mean square of ``a - b`` over all coordinates, in float64."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def solver_errors(
    model: Model,
    noise: Tensor,
    nfes: Iterable[int],
    reference: Tensor | None = None,
    metrics: dict[str, Metric] | None = None,
    solvers: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """``"solver|grid|nfe"`` -> ``{"nfe", "rmse", *metrics}`` for every row of ``solvers`` (default
    :func:`solver_rows`) at every NFE, sampled in float32 from ``noise``: the RMSE to ``reference`` (when given) and
    each metric of the samples, computed in that order (metrics may draw from a shared generator); all NaN where a
    sample is not finite."""
    rows = solver_rows() if solvers is None else solvers
    out: dict[str, dict[str, float]] = {}
    for row, make in rows.items():
        for nfe in nfes:
            x = run_solver(make(), model, noise.float(), nfe)
            finite = bool(torch.isfinite(x).all())
            entry = {"nfe": nfe}
            if reference is not None:
                entry["rmse"] = rmse(x, reference) if finite else math.nan
            for name, metric in (metrics or {}).items():
                entry[name] = metric(x) if finite else math.nan
            out[f"{row}|{nfe}"] = entry
    return out


def exact_mixture_errors(
    mixture: GaussianMixture,
    samples: int,
    seed: int,
    nfes: Iterable[int],
    reference_steps: int = 2000,
    projections: int = 512,
    solvers: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """The samplers on ``mixture``'s exact epsilon model (diffusers' default VP schedule) for one seed: ``samples``
    noise vectors and two sets of true samples drawn from ``seed``; the converged solution in ``reference_steps``
    (and half as many, ``reference_halving_rmse``: its convergence). Per row and NFE (:func:`solver_errors`): RMSE to
    the converged solution, ``sw`` (sliced W2 to the true samples over ``projections`` directions, drawn from one
    generator seeded ``10000 + seed`` for the floor, the reference and every run in turn) and ``ll`` (mean
    log-likelihood). Next to them the floor (true vs true samples) and the true samples' likelihood."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, mixture.dim, generator=g, dtype=torch.float64)
    truth, truth2 = mixture.sample(samples, g), mixture.sample(samples, g)
    model = mixture.epsilon_model(DPMSolverMultistepScheduler().alphas_cumprod)
    reference = converged_solution(model, noise, reference_steps)
    half = converged_solution(model, noise, reference_steps // 2)
    directions = torch.Generator().manual_seed(10_000 + seed)

    def sw(x: Tensor) -> float:
        return float(sliced_wasserstein(x, truth, projections, directions))

    def ll(x: Tensor) -> float:
        return float(mixture.log_prob(x).mean())

    return {
        "seed": seed,
        "reference_halving_rmse": rmse(reference, half),
        "sw_floor": sw(truth2),
        "sw_reference": sw(reference),
        "ll_true": ll(truth),
        "ll_reference": ll(reference),
        "runs": solver_errors(model, noise, nfes, reference, {"sw": sw, "ll": ll}, solvers),
    }


def network_model(net: nn.Module, device: torch.device | str = "cpu") -> Model:
    """``model(x, t)`` of a denoiser ``net(x, t)`` (e.g. a :class:`~entreg.modules.diffusion.DiffusionModule`'s EMA
    network) for :func:`run_solver`: ``net`` in eval mode on ``device`` in float32 without gradients, ``t``
    broadcast to the batch; the output comes back on ``x``'s device and dtype (schedulers may run in float64)."""
    net = net.eval().to(device)

    @torch.no_grad()
    def model(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).to(device).reshape(-1).expand(len(x))
        return net(x.to(device, torch.float32), t).to(x.device, x.dtype)

    return model
