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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor, nn

from entreg.diffusion.evodiff import EVODiffScheduler
from entreg.diffusion.gmm import GaussianMixture
from entreg.diffusion.metrics import sliced_wasserstein

__all__ = [
    "FLOW_GRIDS",
    "FLOW_SOLVERS",
    "GRIDS",
    "LOGSNR_SOLVERS",
    "SOLVERS",
    "FlowGrid",
    "converged_flow_solution",
    "converged_solution",
    "exact_mixture_errors",
    "flow_mixture_errors",
    "network_model",
    "rmse",
    "run_solver",
    "solver_errors",
    "solver_rows",
]

Model = Callable[[Tensor, Tensor], Tensor]
Metric = Callable[[Tensor], float]
SchedulerFactory = Callable[[type, dict[str, Any]], Any]
TimestepSetter = Callable[[Any, int, torch.device], None]

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
    set_timesteps: TimestepSetter | None = None,
) -> Tensor:
    """Samples of ``scheduler`` in ``nfe`` timesteps (on ``noise``'s device), one ``model(x, t)`` call each, from
    ``noise`` (scaled by the scheduler's ``init_noise_sigma``, and the model's input by its ``scale_model_input``, where
    it has them: FlowMatchEuler has neither); ``generator`` seeds the steps of stochastic
    schedulers (those whose ``step`` takes one). Raises if the scheduler takes another number of timesteps, unless
    ``exact_nfe=False`` (e.g. Heun's two per step). ``set_timesteps(scheduler, nfe, device)`` sets the grid (default
    ``scheduler.set_timesteps(nfe, device=device)``; :meth:`FlowGrid.set_timesteps`: as a flow pipeline does)."""
    if set_timesteps is None:
        scheduler.set_timesteps(nfe, device=noise.device)
    else:
        set_timesteps(scheduler, nfe, noise.device)
    if exact_nfe and len(scheduler.timesteps) != nfe:
        raise RuntimeError(f"{type(scheduler).__name__} took {len(scheduler.timesteps)} timesteps for NFE {nfe}")
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    takes_generator = generator is not None and "generator" in inspect.signature(scheduler.step).parameters
    step_options = {"generator": generator} if takes_generator else {}
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scale(x, t), t), t, x, **step_options).prev_sample
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
    set_timesteps: TimestepSetter | None = None,
) -> dict[str, dict[str, float]]:
    """``"solver|grid|nfe"`` -> ``{"nfe", "rmse", *metrics}`` for every row of ``solvers`` (default
    :func:`solver_rows`) at every NFE, sampled in float32 from ``noise``: the RMSE to ``reference`` (when given) and
    each metric of the samples, computed in that order (metrics may draw from a shared generator); all NaN where a
    sample is not finite. ``set_timesteps``: as in :func:`run_solver`."""
    rows = solver_rows() if solvers is None else solvers
    out: dict[str, dict[str, float]] = {}
    for row, make in rows.items():
        for nfe in nfes:
            x = run_solver(make(), model, noise.float(), nfe, set_timesteps=set_timesteps)
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


# ---- flow matching: the grids of SD3- and FLUX-class pipelines -----------------------------------------------------

# name -> scheduler class and the options that differ from what the pipeline's config gives it
FLOW_SOLVERS: dict[str, tuple[type, dict[str, Any]]] = {
    "FlowMatchEuler": (FlowMatchEulerDiscreteScheduler, {}),
    "DPM++2M": (DPMSolverMultistepScheduler, {"solver_order": 2}),
    "UniPC": (UniPCMultistepScheduler, {}),
    # the last step chosen by the grid (what from_config sets), the reference's last step, the ordinary one
    "EVODiff": (EVODiffScheduler, {"final_step": "auto"}),
    "EVODiff-e": (EVODiffScheduler, {"final_step": "evodiff"}),
    "EVODiff-f": (EVODiffScheduler, {"final_step": "dpmsolver"}),
    # the reference's steps: without max_step_ratio (undefined on a grid starting at sigma = 1)
    "EVODiff-r": (EVODiffScheduler, {"max_step_ratio": None, "final_step": "evodiff"}),
    "EVODiff-rf": (EVODiffScheduler, {"max_step_ratio": None, "final_step": "dpmsolver"}),
}
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class FlowGrid:
    """The grid a flow-matching pipeline gives its scheduler, and the solvers compared on it.

    Args:
        config: the options of the ``FlowMatchEulerDiscreteScheduler`` the pipeline ships (SD3: ``shift=3.0``).
        pipeline_sigmas: the pipeline passes ``sigmas=linspace(1, 1/N, N)`` (FLUX); False: only N (SD3).
        mu: the dynamic-shift exponent the pipeline passes (FLUX: from the image's token count).
        hand_set: every scheduler is built with DPM-Solver's flow keys set by hand (``use_flow_sigmas=True,
            prediction_type="flow_prediction", flow_shift=shift``) and samples on its own grid (DPM-Solver's flow
            grid, integer timesteps); False: every scheduler samples on the pipeline's grid (:meth:`sigmas`).
        solvers: the :data:`FLOW_SOLVERS` compared on this grid.
    """

    config: Mapping[str, Any]
    pipeline_sigmas: bool = False
    mu: float | None = None
    hand_set: bool = False
    solvers: tuple[str, ...] = ("FlowMatchEuler", "DPM++2M", "UniPC", "EVODiff", "EVODiff-e", "EVODiff-f")

    @property
    def pipeline_config(self) -> dict[str, Any]:
        """The scheduler config as a pipeline directory holds it."""
        return {**FlowMatchEulerDiscreteScheduler(**self.config).config, "_class_name": FLOW_MATCH}

    def _pipeline_call(self, steps: int) -> dict[str, Any]:
        """The arguments of the pipeline's ``set_timesteps`` call for ``steps`` steps."""
        call: dict[str, Any] = {"mu": self.mu} if self.mu is not None else {}
        if self.pipeline_sigmas:
            return {**call, "sigmas": torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).numpy()}
        return {**call, "num_inference_steps": steps}

    def sigmas(self, steps: int) -> Tensor:
        """The pipeline's grid for ``steps`` steps: ``FlowMatchEulerDiscreteScheduler``'s sigmas (final 0), float64.

        Example:
            >>> [round(float(s), 3) for s in FLOW_GRIDS["SD3"].sigmas(4)]
            [1.0, 0.858, 0.602, 0.009, 0.0]
        """
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline_config)
        scheduler.set_timesteps(**self._pipeline_call(steps))
        return scheduler.sigmas.double()

    def scheduler(self, solver: str) -> Any:
        """A fresh scheduler of :data:`FLOW_SOLVERS` ``solver`` for this pipeline: EVODiff and FlowMatchEuler from
        the pipeline's config (``from_config``), DPM-Solver and UniPC with the flow keys a user sets by hand."""
        cls, options = FLOW_SOLVERS[solver]
        hand = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": self.config["shift"]}
        if self.hand_set:
            if cls is FlowMatchEulerDiscreteScheduler:
                raise ValueError("FlowMatchEuler has no hand-set DPM-Solver flow keys; use a pipeline grid")
            return cls(**hand, **options)
        if cls in (EVODiffScheduler, FlowMatchEulerDiscreteScheduler):
            return cls.from_config(self.pipeline_config, **options)
        return cls.from_config(self.pipeline_config, **hand, use_dynamic_shifting=False, **options)

    def set_timesteps(self, scheduler: Any, steps: int, device: torch.device | str | None = None) -> None:
        """Set ``scheduler``'s grid of ``steps`` steps: EVODiff and FlowMatchEuler as the pipeline calls them; any
        other scheduler gets the pipeline's grid (:meth:`sigmas`) and float timesteps ``1000 sigma`` written into it
        (DPM-Solver's ``set_timesteps`` takes no sigmas; UniPC's would move the first level to ``1 - 1e-6`` and
        truncate the timesteps); with ``hand_set``, ``scheduler.set_timesteps(steps)``: its own grid."""
        if self.hand_set:
            scheduler.set_timesteps(steps, device=device)
        elif isinstance(scheduler, (EVODiffScheduler, FlowMatchEulerDiscreteScheduler)):
            scheduler.set_timesteps(device=device, **self._pipeline_call(steps))
        else:
            scheduler.set_timesteps(steps, device=device)
            grid = self.sigmas(steps)
            scheduler.sigmas = grid.float()
            scheduler.timesteps = (grid[:-1] * scheduler.config.num_train_timesteps).float().to(device)


FLUX_CONFIG = {
    "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}  # fmt: skip
# SD3/SD3.5 ship shift 3; FLUX.1-dev dynamic shifting, and mu = 1.15 at 1024 x 1024 (4096 image tokens, max_shift)
FLOW_GRIDS: dict[str, FlowGrid] = {
    "SD3": FlowGrid({"shift": 3.0}),
    "FLUX": FlowGrid(FLUX_CONFIG, pipeline_sigmas=True, mu=1.15),
    "SD3-hand": FlowGrid(
        {"shift": 3.0},
        hand_set=True,
        solvers=("DPM++2M", "EVODiff", "EVODiff-e", "EVODiff-f", "EVODiff-r", "EVODiff-rf"),
    ),
}


def converged_flow_solution(model: Model, noise: Tensor, steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """The reference solution of a flow-matching ODE (``model(x, t)`` a velocity at ``sigma = t / 1000``) from
    ``noise`` at ``sigma = 1``: DPM-Solver++(2M) (:class:`EVODiffScheduler` with its coefficients neutral) from 1 to
    ``steps`` levels uniform in logSNR from ``sigma = 1 - 1e-4`` to ``1e-4``, then the data prediction, in float64."""
    scheduler = EVODiffScheduler(
        prediction_type="flow_prediction", num_train_timesteps=num_train_timesteps, balance=False,
        adaptive_ratio=False, corrector=False, final_step="dpmsolver",
    )  # fmt: skip
    end = math.log(1e-4 / (1 - 1e-4))  # logSNR / 2 at sigma = 1e-4, and minus it at 1 - 1e-4
    levels = torch.sigmoid(torch.linspace(-end, end, steps, dtype=torch.float64))  # sigma = 1 / (1 + e^(logSNR/2))
    scheduler.set_timesteps(sigmas=torch.cat([torch.ones(1, dtype=torch.float64), levels]))
    x = noise.double()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def flow_mixture_errors(
    mixture: GaussianMixture,
    samples: int,
    seed: int,
    nfes: Iterable[int],
    grids: Mapping[str, FlowGrid] | None = None,
    reference_steps: int = 2000,
) -> dict[str, Any]:
    """The flow-matching samplers on ``mixture``'s exact velocity (:meth:`GaussianMixture.velocity_model`, the SD3/FLUX
    parametrisation) for one seed: ``samples`` noise vectors drawn from ``seed``, the converged solution in
    ``reference_steps`` (and half as many, ``reference_halving_rmse``); per ``"solver|grid|nfe"`` the RMSE to it
    (:func:`solver_errors`) for every grid of ``grids`` (default :data:`FLOW_GRIDS`) and its solvers."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, mixture.dim, generator=g, dtype=torch.float64)
    model = mixture.velocity_model()
    reference = converged_flow_solution(model, noise, reference_steps)
    runs: dict[str, dict[str, float]] = {}
    for name, grid in (FLOW_GRIDS if grids is None else grids).items():
        rows = {f"{solver}|{name}": partial(grid.scheduler, solver) for solver in grid.solvers}
        runs |= solver_errors(model, noise, nfes, reference, solvers=rows, set_timesteps=grid.set_timesteps)
    halving = rmse(reference, converged_flow_solution(model, noise, reference_steps // 2))
    return {"seed": seed, "reference_halving_rmse": halving, "runs": runs}


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
