"""LightningModules that pair backbones with entropy losses and activations."""

from entreg.modules.classification import ClassificationModule

__all__ = ["ClassificationModule"]
