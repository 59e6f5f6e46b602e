"""Diffusion sampling: the EVODiff scheduler and the exactly solvable Gaussian-mixture data."""

from entreg.diffusion.evodiff import EVODiffScheduler
from entreg.diffusion.gmm import GaussianMixture

__all__ = ["EVODiffScheduler", "GaussianMixture"]
