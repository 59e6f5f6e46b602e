"""Tiny randomly initialised SD3, FLUX and Stable Diffusion (1.x-class UNet) pipelines, saved in the diffusers
format, for tests, benchmarks in tiny mode and smoke runs without downloads.

The components are the real classes at their smallest working sizes (as in diffusers' own tests): a one-layer
``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` or a two-block ``UNet2DConditionModel``, a one-block
``AutoencoderKL``, tiny CLIP (and, for FLUX, T5) text encoders from ``transformers`` configs and tokenizers over a
vocabulary of a few words written here. SD3 is saved without its T5 encoder (the pipeline then uses zero T5
embeddings); SD with SD 1.5's scheduler config (``PNDMScheduler``, scaled-linear betas) and no safety checker. Needs
``transformers`` (``pip install "entreg[t2i]"``).

Example:
    >>> import tempfile
    >>> path = save_tiny_pipeline(tempfile.mkdtemp(), "sd3", shift=3.0)
    >>> sorted(p.name for p in path.iterdir())[:3]
    ['model_index.json', 'scheduler', 'text_encoder']
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["TINY_WORDS", "save_tiny_pipeline"]

TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house", "on", "the")


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in TINY_WORDS:
        vocab[f"{word}</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(f"{c}</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", *(f"▁{w}" for w in TINY_WORDS), *"abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=[(p, -1.0) for p in pieces], extra_ids=0)


def _clip_config(vocab_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab_size, hidden_act="gelu", projection_dim=projection_dim,
    )  # fmt: skip


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def save_tiny_pipeline(directory: str | Path, kind: str = "sd3", seed: int = 0, shift: float = 3.0) -> Path:
    """Build a tiny random ``kind`` ("sd3", "flux" or "sd") pipeline (seeded) and ``save_pretrained`` it into
    ``directory``; returns the directory. ``shift`` is the flow scheduler's (FLUX: dynamic shifting, as FLUX.1; not
    used by "sd")."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(seed)  # the global RNG is left as it was
        tokenizer = _clip_tokenizer(Path(scratch))
        vocab = len(tokenizer)
        if kind == "sd3":
            from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
            from transformers import CLIPTextModelWithProjection

            transformer = SD3Transformer2DModel(
                sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
                out_channels=4,
            )  # fmt: skip
            pipeline = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=_vae(4),
                text_encoder=CLIPTextModelWithProjection(_clip_config(vocab, 32)), tokenizer=tokenizer,
                text_encoder_2=CLIPTextModelWithProjection(_clip_config(vocab, 32)), tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None,
            )  # fmt: skip
        elif kind == "flux":
            from diffusers import FluxPipeline, FluxTransformer2DModel
            from transformers import CLIPTextModel, T5Config, T5EncoderModel

            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            )  # fmt: skip
            t5_tokenizer = _t5_tokenizer()
            t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                         num_heads=4, decoder_start_token_id=0))  # fmt: skip
            scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=True)
            pipeline = FluxPipeline(
                transformer=transformer, scheduler=scheduler, vae=_vae(1),
                text_encoder=CLIPTextModel(_clip_config(vocab, 32)), tokenizer=tokenizer, text_encoder_2=t5,
                tokenizer_2=t5_tokenizer,
            )  # fmt: skip
        elif kind == "sd":
            from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
            from transformers import CLIPTextModel

            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=2, norm_num_groups=2,
            )  # fmt: skip
            scheduler = PNDMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                set_alpha_to_one=False, steps_offset=1,
            )  # fmt: skip
            pipeline = StableDiffusionPipeline(
                vae=_vae(4), text_encoder=CLIPTextModel(_clip_config(vocab, 32)), tokenizer=tokenizer, unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        else:
            raise ValueError(f"kind must be 'sd3', 'flux' or 'sd', got {kind!r}")
        pipeline.save_pretrained(directory)
    return directory
