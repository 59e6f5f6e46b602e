"""Diffusion: the EVODiff scheduler, the exactly solvable Gaussian mixture and sample-quality metrics.

Names are imported on first use, so importing the package does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EVODiffScheduler": "entreg.diffusion.evodiff",
    "GaussianMixture": "entreg.diffusion.gmm",
    "scheduler_alpha_sigma": "entreg.diffusion.gmm",
    "vp_alpha_sigma": "entreg.diffusion.gmm",
    "frechet_distance": "entreg.diffusion.metrics",
    "sliced_wasserstein": "entreg.diffusion.metrics",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'entreg.diffusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
