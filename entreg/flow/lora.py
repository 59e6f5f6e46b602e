"""LoRA adapters on a diffusers transformer through ``peft``, saved in diffusers' LoRA format.

Flow-GRPO's defaults (yifan123/flow_grpo @ ac4c86e, ``scripts/train_sd3.py``): rank 32, alpha 64, Gaussian
initialisation, on the attention projections of both streams, :data:`ATTENTION_TARGETS`. The reference policy of the
KL is the same transformer with its adapter disabled (:func:`adapter_disabled`), so no second copy is kept.

- :func:`add_lora` adds the adapter (``transformer.add_adapter``) and leaves only its weights trainable;
- :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with ``<Pipeline>.save_lora_weights`` (rank and
  alpha in its metadata), which ``pipeline.load_lora_weights(directory)`` of an unmodified pipeline loads;
- :func:`export_merged` writes a full pipeline with the adapter fused into the transformer's weights.

Example:
    >>> import tempfile
    >>> from entreg.flow.pipeline import load_flow_pipeline
    >>> from entreg.flow.tiny_pipeline import save_tiny_pipeline
    >>> pipeline = load_flow_pipeline(save_tiny_pipeline(tempfile.mkdtemp()))
    >>> add_lora(pipeline.transformer, rank=4, alpha=8)
    >>> trainable = [n for n, p in pipeline.transformer.named_parameters() if p.requires_grad]
    >>> len(trainable), all("lora_" in n for n in trainable)  # A, B of 7 projections (no to_add_out in a last block)
    (14, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["ATTENTION_TARGETS", "adapter_disabled", "add_lora", "export_merged", "has_lora", "save_lora"]

ATTENTION_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def add_lora(
    transformer: nn.Module,
    rank: int = 32,
    alpha: float = 64.0,
    targets: Sequence[str] = ATTENTION_TARGETS,
    init: str | bool = "gaussian",
) -> None:
    """Freeze ``transformer`` and add a LoRA adapter (``peft.LoraConfig``) of ``rank`` and ``alpha`` on the
    modules whose names end with one of ``targets``; only the adapter trains."""
    from peft import LoraConfig

    if rank < 1 or alpha <= 0:
        raise ValueError(f"need rank >= 1 and alpha > 0, got {rank=}, {alpha=}")
    names = [name for name, _ in transformer.named_modules()]
    if not any(n == t or n.endswith(f".{t}") for t in targets for n in names):
        raise ValueError(f"no module of {type(transformer).__name__} matches the LoRA targets {list(targets)}")
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets))
    transformer.add_adapter(config)


def has_lora(transformer: nn.Module) -> bool:
    """Whether ``transformer`` carries a peft adapter."""
    return bool(getattr(transformer, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapter_disabled(transformer: nn.Module) -> Iterator[None]:
    """The base transformer inside the block: its adapter is disabled and re-enabled after."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def save_lora(pipeline_class: type, transformer: nn.Module, directory: str | Path) -> Path:
    """Write ``transformer``'s adapter into ``directory`` in diffusers' LoRA format (with its rank and alpha)."""
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    layers = get_peft_model_state_dict(transformer)
    metadata = transformer.peft_config["default"].to_dict()
    pipeline_class.save_lora_weights(
        directory, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return directory


def export_merged(pipeline_path: str | Path, lora_directory: str | Path, directory: str | Path, **load: Any) -> Path:
    """Load the pipeline at ``pipeline_path`` afresh, fuse the LoRA in ``lora_directory`` into its transformer
    and ``save_pretrained`` the result into ``directory`` (it then needs neither peft nor the adapter). A second
    copy of the pipeline is in memory while this runs."""
    from entreg.flow.pipeline import load_flow_pipeline

    pipeline = load_flow_pipeline(pipeline_path, **load)
    pipeline.load_lora_weights(str(lora_directory))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    pipeline.save_pretrained(directory)
    return Path(directory)
