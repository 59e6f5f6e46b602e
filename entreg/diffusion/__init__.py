"""Diffusion: the EVODiff scheduler, the exactly solvable Gaussian mixture, sample-quality metrics, the solver
evaluation of the sampler benchmarks (:mod:`entreg.diffusion.evaluation`) and sampling with diffusers pipelines
(:mod:`entreg.diffusion.pipelines`).

Names are imported on first use, so importing the package does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EVODiffScheduler": "entreg.diffusion.evodiff",
    "evodiff_config": "entreg.diffusion.evodiff",
    "is_flow_matching_config": "entreg.diffusion.evodiff",
    "load_pipeline": "entreg.diffusion.pipelines",
    "pipeline_scheduler": "entreg.diffusion.pipelines",
    "read_prompts": "entreg.diffusion.pipelines",
    "sample_pipeline": "entreg.diffusion.pipelines",
    "GaussianMixture": "entreg.diffusion.gmm",
    "scheduler_alpha_sigma": "entreg.diffusion.gmm",
    "vp_alpha_sigma": "entreg.diffusion.gmm",
    "FeatureFrechetDistance": "entreg.diffusion.metrics",
    "frechet_distance": "entreg.diffusion.metrics",
    "sliced_wasserstein": "entreg.diffusion.metrics",
    "FLOW_GRIDS": "entreg.diffusion.evaluation",
    "FLOW_SOLVERS": "entreg.diffusion.evaluation",
    "FlowGrid": "entreg.diffusion.evaluation",
    "converged_flow_solution": "entreg.diffusion.evaluation",
    "flow_mixture_errors": "entreg.diffusion.evaluation",
    "GRIDS": "entreg.diffusion.evaluation",
    "LOGSNR_SOLVERS": "entreg.diffusion.evaluation",
    "SOLVERS": "entreg.diffusion.evaluation",
    "converged_solution": "entreg.diffusion.evaluation",
    "exact_mixture_errors": "entreg.diffusion.evaluation",
    "network_model": "entreg.diffusion.evaluation",
    "rmse": "entreg.diffusion.evaluation",
    "run_solver": "entreg.diffusion.evaluation",
    "solver_errors": "entreg.diffusion.evaluation",
    "solver_rows": "entreg.diffusion.evaluation",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'entreg.diffusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
