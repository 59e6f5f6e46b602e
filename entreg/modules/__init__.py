"""LightningModules that pair backbones with entropy losses and activations, diffusion and flow-matching
training, GRPO fine-tuning of flow models, pretrained classifiers from weight files (timm, torchvision,
RobustBench) for testing and test-time adaptation, and SAC/PPO agents (these two need
``pip install "entreg[rl]"`` and are imported on first use)."""

import importlib
from typing import Any

from entreg.modules.classification import ClassificationModule
from entreg.modules.diffusion import DiffusionModule
from entreg.modules.flow import FlowMatchingModule
from entreg.modules.grpo import GRPOModule
from entreg.modules.pretrained import PretrainedClassifier

_LAZY = {
    "SACModule": "entreg.modules.sac",
    "PPOModule": "entreg.modules.ppo",
    "GRPOPipelineModule": "entreg.modules.grpo_pipeline",
}

__all__ = [
    "ClassificationModule",
    "DiffusionModule",
    "FlowMatchingModule",
    "GRPOModule",
    "PretrainedClassifier",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'entreg.modules' has no attribute {name!r}")
