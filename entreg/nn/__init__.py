"""Entropy-aware ``nn.Module``s: ERA activations, entropy penalties, backbones by name."""

from entreg.nn.backbones import BACKBONES, SmallCNN, build_backbone, register_backbone
from entreg.nn.era import ERA, GaussianERA, era_logits, era_target_range
from entreg.nn.output import OUTPUT_ACTIVATIONS, build_output_activation
from entreg.nn.penalties import ConfidencePenalty

__all__ = [
    "BACKBONES",
    "ERA",
    "OUTPUT_ACTIVATIONS",
    "ConfidencePenalty",
    "GaussianERA",
    "SmallCNN",
    "build_backbone",
    "build_output_activation",
    "era_logits",
    "era_target_range",
    "register_backbone",
]
