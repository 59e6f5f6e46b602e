"""Diffusers flow-matching text-to-image pipelines (SD3, FLUX) as policies for GRPO.

:func:`load_flow_pipeline` loads a pipeline from a local directory with ``from_pretrained`` and refuses one that
is not flow matching (its scheduler must be ``FlowMatchEulerDiscreteScheduler``). :class:`PipelinePolicy` turns
it into what :mod:`entreg.flow.rollout` needs: the pipeline's own sigma grid (:meth:`PipelinePolicy.grid`, the
``sigmas`` its ``__call__`` would use, shift and dynamic shifting included), the shape of one latent, the
velocity ``v = eps - x0`` of the transformer with or without classifier-free guidance
(:meth:`PipelinePolicy.velocity`; the diffusers transformers predict exactly this ``v`` with ``t = sigma``), prompt
embeddings computed once per prompt and cached on the CPU (:meth:`PipelinePolicy.embeddings`), and decoding to
images in [0, 1] (:meth:`PipelinePolicy.decode`). Text encoders and the VAE stay frozen; with ``offload=True`` they
sit on the CPU and visit the transformer's device only to encode or decode.

What differs between pipelines lives in :data:`PIPELINE_FAMILIES` (a registry keyed by the pipeline's class
name, like the GRPO variants): how to encode prompts, call the transformer, lay out latents and choose the
default sigmas. Adding a family is one :func:`register_family` call.

Example (a tiny random SD3 pipeline, :func:`entreg.flow.tiny_pipeline.save_tiny_pipeline`):
    >>> import tempfile, torch
    >>> from entreg.flow.tiny_pipeline import save_tiny_pipeline
    >>> path = save_tiny_pipeline(tempfile.mkdtemp(), "sd3")
    >>> policy = PipelinePolicy(load_flow_pipeline(path), height=16, width=16, guidance_scale=1.0)
    >>> policy.latent_shape, [round(t, 3) for t in policy.grid(4)]  # SD3's own spacing, shift 3
    ((4, 16, 16), [1.0, 0.858, 0.602, 0.009, 0.0])
    >>> embeds = policy.embeddings(["a cat"], torch.device("cpu"))
    >>> v = policy.velocity(torch.randn(1, 4, 16, 16), torch.ones(1), embeds)
    >>> policy.decode(v).shape
    torch.Size([1, 3, 16, 16])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from entreg.flow.variants import register

__all__ = [
    "PIPELINE_FAMILIES",
    "PipelineFamily",
    "PipelinePolicy",
    "get_family",
    "load_flow_pipeline",
    "register_family",
]

Embeddings = dict[str, Tensor]


@dataclass(frozen=True)
class PipelineFamily:
    """How entreg drives one kind of pipeline.

    Args:
        encode: ``(pipeline, prompts, device, max_sequence_length) -> {name: (B, ...) tensor}``: the transformer's
            text inputs.
        forward: ``(policy, transformer, x, sigma, embeds) -> v``: one transformer call on latents ``x`` in this
            family's layout at noise levels ``sigma`` (B,), as the pipeline's ``__call__`` makes it.
        latent_shape: ``policy -> shape`` of one latent in the family's layout.
        unpack: ``(policy, x) -> (B, C, h, w)``: latents in the VAE's layout.
        sigmas: ``steps -> array | None``: the sigmas the pipeline passes to ``set_timesteps`` (None: the
            scheduler's own spacing).
    """

    encode: Callable[..., Embeddings]
    forward: Callable[..., Tensor]
    latent_shape: Callable[[Any], tuple[int, ...]]
    unpack: Callable[[Any, Tensor], Tensor]
    sigmas: Callable[[int], Any]


PIPELINE_FAMILIES: dict[str, PipelineFamily] = {}


def register_family(pipeline_class: str, family: PipelineFamily) -> PipelineFamily:
    """Drive pipelines of class name ``pipeline_class`` with ``family``."""
    return register(PIPELINE_FAMILIES, pipeline_class, family, "pipeline family")


def get_family(pipeline: Any) -> PipelineFamily:
    """The family of ``pipeline``, or a ValueError naming the supported pipelines."""
    name = type(pipeline).__name__
    if name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"entreg fine-tunes flow-matching text-to-image pipelines ({', '.join(sorted(PIPELINE_FAMILIES))}); "
            f"got a {name}"
        )
    return PIPELINE_FAMILIES[name]


def _check_flow_matching(pipeline: Any, where: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = getattr(pipeline, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"{where} is not a flow-matching pipeline: its scheduler is {type(scheduler).__name__}, entreg's GRPO "
            "needs FlowMatchEulerDiscreteScheduler (StableDiffusion3Pipeline, FluxPipeline)"
        )
    get_family(pipeline)


def load_flow_pipeline(path: str | Path, torch_dtype: torch.dtype | str | None = None) -> Any:
    """:func:`entreg.nn.pretrained.load_pipeline` (a local directory, components saved as ``null``, e.g. SD3 without
    its T5 encoder, passed as None), checked to be a supported flow-matching pipeline."""
    from entreg.nn.pretrained import load_pipeline

    pipeline = load_pipeline(path, torch_dtype)
    _check_flow_matching(pipeline, str(Path(path).expanduser()))
    return pipeline


class PipelinePolicy:
    """A flow-matching pipeline as a velocity field over latents, with cached prompt embeddings.

    Args:
        pipeline: a loaded pipeline (:func:`load_flow_pipeline`).
        height, width: image size in pixels.
        guidance_scale: classifier-free guidance ``v_u + w (v_c - v_u)`` with the ``negative_prompt``'s
            embedding as the unconditional branch; <= 1: no CFG (one transformer call per velocity).
        embedded_guidance: FLUX-dev's distilled guidance (passed as ``guidance`` to transformers that have
            ``guidance_embeds``; ignored otherwise).
        negative_prompt: the unconditional prompt ("" as in Flow-GRPO).
        max_sequence_length: T5 tokens.
        offload: keep text encoders and VAE on the CPU between uses.
        autocast: run the transformer under bf16 autocast (velocities and everything after them in float32).
    """

    def __init__(
        self,
        pipeline: Any,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 4.5,
        embedded_guidance: float = 3.5,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        offload: bool = True,
        autocast: bool = False,
    ) -> None:
        _check_flow_matching(pipeline, type(pipeline).__name__)
        self.pipeline, self.family = pipeline, get_family(pipeline)
        multiple = pipeline.vae_scale_factor * 2
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        self.height, self.width = height, width
        self.guidance_scale, self.embedded_guidance = float(guidance_scale), float(embedded_guidance)
        self.negative_prompt, self.max_sequence_length = negative_prompt, max_sequence_length
        self.offload, self.autocast = offload, autocast
        self.cache: dict[str, Embeddings] = {}
        for module in self._frozen():
            module.requires_grad_(False).eval()

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.family.latent_shape(self)

    def grid(self, steps: int) -> list[float]:
        """The ``steps + 1`` sigmas (1 down to 0) the pipeline's ``__call__`` uses for ``steps`` steps."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            c = scheduler.config
            shape = self.latent_shape  # the pipelines count image tokens (FLUX's are packed already)
            patch = getattr(self.pipeline.transformer.config, "patch_size", 1)
            seq_len = shape[0] if len(shape) == 2 else (shape[1] // patch) * (shape[2] // patch)
            slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
            kwargs["mu"] = seq_len * slope + c.base_shift - slope * c.base_image_seq_len
        scheduler.set_timesteps(steps, sigmas=self.family.sigmas(steps), **kwargs)
        return [float(s) for s in scheduler.sigmas]

    def _frozen(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if isinstance(m, nn.Module)]

    @contextlib.contextmanager
    def _on(self, device: torch.device, modules: Sequence[nn.Module]) -> Iterator[None]:
        """``modules`` on ``device`` inside the block (back to the CPU after it when offloading)."""
        for module in modules:
            module.to(device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")

    @torch.no_grad()
    def embeddings(self, prompts: Sequence[str], device: torch.device) -> Embeddings:
        """The transformer's text inputs for ``prompts`` (B rows, on ``device``), each prompt encoded once and
        cached on the CPU; ``""``-keyed entries are the negative prompt's."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            encoders = [m for m in self._frozen() if m is not getattr(self.pipeline, "vae", None)]
            with self._on(device, encoders):
                for prompt in missing:  # one at a time: an embedding must not depend on what it was batched with
                    encoded = self.family.encode(self.pipeline, [prompt], device, self.max_sequence_length)
                    self.cache[prompt] = {k: v[0].cpu() for k, v in encoded.items()}
        return {k: torch.stack([self.cache[p][k] for p in prompts]).to(device) for k in self.cache[prompts[0]]}

    def velocity(
        self,
        x: Tensor,
        sigma: Tensor,
        embeds: Embeddings,
        transformer: nn.Module | None = None,
        detach_uncond: bool = False,
    ) -> Tensor:
        """The (guided) velocity at latents ``x`` and noise levels ``sigma`` (B,), float32. With CFG, one batched
        call on ``[uncond; cond]`` as the pipeline does, the unconditional half detached when
        ``detach_uncond`` (Flow-GRPO's training forward)."""
        transformer = self.pipeline.transformer if transformer is None else transformer
        dtype = next(transformer.parameters()).dtype
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if not self.cfg:
                return self.family.forward(self, transformer, x.to(dtype), sigma, embeds).float()
            negative = self.embeddings([self.negative_prompt] * len(x), x.device)
            both = {k: torch.cat([negative[k], embeds[k]]) for k in embeds}
            xx, ss = torch.cat([x, x]).to(dtype), torch.cat([sigma, sigma])
            v_uncond, v_cond = self.family.forward(self, transformer, xx, ss, both).float().chunk(2)
        if detach_uncond:
            v_uncond = v_uncond.detach()
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x: Tensor, batch_size: int = 8) -> Tensor:
        """Latents ``x`` decoded by the VAE to images (B, 3, H, W) in [0, 1], float32."""
        vae = self.pipeline.vae
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        images = []
        with self._on(x.device, [vae]):
            for chunk in x.split(batch_size):
                latents = self.family.unpack(self, chunk)
                latents = latents / config.scaling_factor + shift
                images.append(vae.decode(latents.to(vae.dtype), return_dict=False)[0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


# --- the families ---------------------------------------------------------------------------------------------


def _num_train_timesteps(policy: PipelinePolicy) -> int:
    return policy.pipeline.scheduler.config.num_train_timesteps


def _sd3_encode(pipeline: Any, prompts: list[str], device: torch.device, max_sequence_length: int) -> Embeddings:
    embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )  # fmt: skip
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _sd3_forward(policy: PipelinePolicy, transformer: nn.Module, x: Tensor, sigma: Tensor, embeds: Embeddings):
    timestep = sigma.float() * _num_train_timesteps(policy)  # the scheduler's timesteps, as the pipeline passes them
    return transformer(hidden_states=x, timestep=timestep, **embeds, return_dict=False)[0]


def _sd3_latent_shape(policy: PipelinePolicy) -> tuple[int, ...]:
    f = policy.pipeline.vae_scale_factor
    return (policy.pipeline.transformer.config.in_channels, policy.height // f, policy.width // f)


def _flux_encode(pipeline: Any, prompts: list[str], device: torch.device, max_sequence_length: int) -> Embeddings:
    embeds, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _flux_latent_size(policy: PipelinePolicy) -> tuple[int, int]:
    """FLUX's latent grid before packing 2x2 patches into tokens."""
    f = policy.pipeline.vae_scale_factor
    return 2 * (policy.height // (f * 2)), 2 * (policy.width // (f * 2))


def _flux_forward(policy: PipelinePolicy, transformer: nn.Module, x: Tensor, sigma: Tensor, embeds: Embeddings):
    height, width = _flux_latent_size(policy)
    img_ids = policy.pipeline._prepare_latent_image_ids(len(x), height // 2, width // 2, x.device, x.dtype)
    txt_ids = torch.zeros(embeds["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
    timestep = sigma.float() * _num_train_timesteps(policy)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((len(x),), policy.embedded_guidance, device=x.device, dtype=torch.float32)
    return transformer(
        hidden_states=x, timestep=timestep / 1000, guidance=guidance, txt_ids=txt_ids, img_ids=img_ids, **embeds,
        return_dict=False,
    )[0]  # fmt: skip


def _flux_latent_shape(policy: PipelinePolicy) -> tuple[int, ...]:
    height, width = _flux_latent_size(policy)
    return ((height // 2) * (width // 2), policy.pipeline.transformer.config.in_channels)


def _flux_unpack(policy: PipelinePolicy, x: Tensor) -> Tensor:
    return policy.pipeline._unpack_latents(x, policy.height, policy.width, policy.pipeline.vae_scale_factor)


register_family(
    "StableDiffusion3Pipeline",
    PipelineFamily(_sd3_encode, _sd3_forward, _sd3_latent_shape, lambda policy, x: x, lambda steps: None),
)
register_family(
    "FluxPipeline",
    PipelineFamily(_flux_encode, _flux_forward, _flux_latent_shape, _flux_unpack, lambda n: np.linspace(1.0, 1 / n, n)),
)
