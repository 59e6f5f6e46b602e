"""entreg: entropy as a first-class training signal for models beyond LLMs.

Every name is imported lazily on first use, so ``import entreg`` (and ``entreg-train --help``)
does not pay for torch, Lightning or timm. The math layer (:mod:`entreg.entropy`) needs only torch.

Example:
    >>> import torch, entreg
    >>> entreg.categorical_entropy(torch.zeros(1, 2))
    tensor([0.6931])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "attention_entropy": "entreg.entropy",
    "categorical_entropy": "entreg.entropy",
    "entropy_from_probs": "entreg.entropy",
    "gaussian_entropy": "entreg.entropy",
    "marginal_entropy": "entreg.entropy",
    "spectral_entropy": "entreg.entropy",
    "von_neumann_entropy": "entreg.entropy",
    "ERA": "entreg.nn",
    "GaussianERA": "entreg.nn",
    "ConfidencePenalty": "entreg.nn",
    "era_logits": "entreg.nn",
    "build_backbone": "entreg.nn",
    "PredictiveEntropy": "entreg.metrics",
    "ClassificationMetrics": "entreg.metrics",
    "ClassificationModule": "entreg.modules",
    "DiffusionModule": "entreg.modules",
    "FlowMatchingModule": "entreg.modules",
    "GRPOModule": "entreg.modules",
    "PretrainedClassifier": "entreg.modules",
    "EntropyController": "entreg.callbacks",
    "EntropyMonitor": "entreg.callbacks",
    "EVODiffScheduler": "entreg.diffusion",
    "GaussianMixture": "entreg.diffusion",
    "DigitsDataModule": "entreg.data",
    "CIFAR10DataModule": "entreg.data",
    "ImageFolderDataModule": "entreg.data",
    "RingDataModule": "entreg.data",
    "SACModule": "entreg.modules.sac",
    "PPOModule": "entreg.modules.ppo",
    "SAC": "entreg.rl.sac",
    "GaussianActorCritic": "entreg.rl.ppo",
    "ReplayBuffer": "entreg.rl.buffer",
    "make_env": "entreg.rl.envs",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'entreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
