"""LightningModules that pair backbones with entropy losses and activations, and diffusion training."""

from entreg.modules.classification import ClassificationModule
from entreg.modules.diffusion import DiffusionModule

__all__ = ["ClassificationModule", "DiffusionModule"]
