"""LightningModules that pair backbones with entropy losses and activations, diffusion and flow-matching
training, and GRPO fine-tuning of flow models."""

from entreg.modules.classification import ClassificationModule
from entreg.modules.diffusion import DiffusionModule
from entreg.modules.flow import FlowMatchingModule
from entreg.modules.grpo import GRPOModule

__all__ = ["ClassificationModule", "DiffusionModule", "FlowMatchingModule", "GRPOModule"]
