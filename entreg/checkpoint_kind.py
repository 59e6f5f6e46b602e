"""Which entreg LightningModule wrote a checkpoint, read on CPU without building the model, so that every command
can reject a checkpoint of the wrong kind before loading anything heavy and name the command that takes it.

Every LightningModule entreg trains is a kind: classifier, diffusion, flow, grpo, grpo_pipeline (text-to-image GRPO,
whose checkpoints hold the trained transformer parameters only), and the RL agents sac and ppo (which ``entreg-train``
resumes; no command evaluates them, their ``evaluate()`` does). A kind is recognised by the
top-level submodules in the checkpoint's ``state_dict`` together with a constructor argument that only its module
saves in ``hyper_parameters``. For example, on an ``entreg-train`` classifier::

    checkpoint_kind("logs/train/runs/<run>/checkpoints/last.ckpt").name  # 'classifier'
    require_kind("logs/train/runs/<run>/checkpoints/last.ckpt", ["diffusion"], "entreg-sample ckpt_path")
    # ValueError: entreg-sample ckpt_path takes a diffusion (DiffusionModule) checkpoint; logs/.../last.ckpt is a
    # classifier checkpoint (ClassificationModule): use it with entreg-adapt ckpt_path=<checkpoint> ...
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KINDS", "CheckpointKind", "checkpoint_kind", "require_kind"]


@dataclass(frozen=True)
class CheckpointKind:
    """One kind of entreg checkpoint: ``name``, the ``module`` that writes it, the ``submodules`` its state_dict
    always has, a ``hparam`` only that module saves, and the ``command`` that takes it."""

    name: str
    module: str
    submodules: frozenset[str]
    hparam: str
    command: str


KINDS = (
    CheckpointKind(
        "classifier",
        "ClassificationModule",
        frozenset({"backbone"}),
        "output_activation",
        "entreg-adapt ckpt_path=<checkpoint> (test-time adaptation)",
    ),
    CheckpointKind(
        "diffusion",
        "DiffusionModule",
        frozenset({"denoiser", "ema"}),
        "prediction_type",
        "entreg-sample ckpt_path=<checkpoint>",
    ),
    CheckpointKind(
        "flow",
        "FlowMatchingModule",
        frozenset({"net", "ema"}),
        "time_sampling",
        "entreg-finetune base_checkpoint=<checkpoint> (GRPO fine-tuning)",
    ),
    CheckpointKind(
        "grpo",
        "GRPOModule",
        frozenset({"net", "base"}),
        "variant",
        "entreg-finetune ckpt_path=<checkpoint> (to resume the fine-tuning run)",
    ),
    CheckpointKind(
        "grpo_pipeline",
        "GRPOPipelineModule",
        frozenset({"transformer"}),
        "prompt_column",
        "entreg-finetune pipeline=<dir> prompts=<file> ckpt_path=<checkpoint> (to resume the text-to-image "
        "fine-tuning run)",
    ),
    CheckpointKind(
        "sac",
        "SACModule",
        frozenset({"sac"}),
        "buffer_size",
        "entreg-train experiment=<its experiment> ckpt_path=<checkpoint> (to resume training); its evaluation "
        "episodes: SACModule.load_from_checkpoint(<checkpoint>).evaluate() in Python",
    ),
    CheckpointKind(
        "ppo",
        "PPOModule",
        frozenset({"policy"}),
        "gae_lambda",
        "entreg-train experiment=<its experiment> ckpt_path=<checkpoint> (to resume training); its evaluation "
        "episodes: PPOModule.load_from_checkpoint(<checkpoint>).evaluate() in Python",
    ),
)


def checkpoint_kind(path: str | Path) -> CheckpointKind | None:
    """The kind of the Lightning checkpoint at ``path`` (memory-mapped on CPU with ``weights_only=True``), or None
    for a Lightning checkpoint of another module. Raises ValueError for a file that is no Lightning checkpoint."""
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(
            f"{path} cannot be read as a checkpoint with torch.load(weights_only=True): {error}"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no state_dict")
    submodules = {key.split(".")[0] for key in checkpoint["state_dict"]}
    hparams = checkpoint.get("hyper_parameters") or {}
    for kind in KINDS:
        if kind.submodules <= submodules and kind.hparam in hparams:
            return kind
    return None


def require_kind(path: str | Path, names: Iterable[str], used_as: str, allow_other: bool = False) -> None:
    """Raise ValueError, naming the checkpoint's kind and the command that takes it, unless the checkpoint at
    ``path`` is one of the kinds ``names``; ``used_as`` names the command and key (``"entreg-sample ckpt_path"``).
    ``allow_other`` lets a checkpoint of a module that is no entreg kind through (a user's own module)."""
    names = list(names)
    wanted = [kind for kind in KINDS if kind.name in names]
    if len(wanted) != len(names):
        raise ValueError(f"unknown kinds {names}: use names from {[kind.name for kind in KINDS]}")
    kind = checkpoint_kind(path)
    if kind in wanted or (kind is None and allow_other):
        return
    expected = " or ".join(f"{k.name} ({k.module})" for k in wanted)
    if kind is None:
        modules = ", ".join(k.module for k in KINDS)
        raise ValueError(f"{used_as} takes a {expected} checkpoint; {path} was written by none of {modules}")
    raise ValueError(
        f"{used_as} takes a {expected} checkpoint; {path} is a {kind.name} checkpoint ({kind.module}): "
        f"use it with {kind.command}"
    )
