"""GRPO fine-tuning of the transformer of a diffusers text-to-image flow pipeline (SD3, FLUX) with a reward."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from entreg.flow.diversity import mean_pairwise_distance
from entreg.flow.image_rewards import ImageReward
from entreg.flow.lora import ATTENTION_TARGETS, adapter_disabled, add_lora, export_merged, save_lora
from entreg.flow.pipeline import PipelinePolicy, load_flow_pipeline
from entreg.flow.prompts import load_prompts
from entreg.flow.sampling import Velocity
from entreg.modules.grpo import GRPOIterations, _Collected, grpo_settings

__all__ = ["GRPOPipelineModule", "pooled_pixels"]

CHECKPOINT_KEY = "grpo_pipeline"


def pooled_pixels(images: Tensor, size: int = 8) -> Tensor:
    """A fixed, cheap feature extractor for the diversity metric: images average-pooled to ``size`` x ``size``,
    flattened (B, 3 size^2)."""
    return nn.functional.adaptive_avg_pool2d(images.float(), size).flatten(1)


class GRPOPipelineModule(GRPOIterations):
    """GRPO on the transformer of a flow-matching text-to-image pipeline (``StableDiffusion3Pipeline``,
    ``FluxPipeline``), with LoRA through ``peft`` or full fine-tuning.

    The iteration is :class:`entreg.modules.grpo.GRPOIterations`'s, the same as
    :class:`~entreg.modules.grpo.GRPOModule`'s:
    every variant of :data:`entreg.flow.variants.GRPO_VARIANTS` (``flow_grpo``, ``mixgrpo``, ``g2rpo``, ``egrpo``
    and any registered one) through its rollout plans, ``sde`` or ``cps`` steps, log-probabilities reduced by the
    mean (clip range 1e-4 as in the references), groups of ``group_size`` images per prompt spread over the DDP
    ranks with all-gathered rewards, the cost counters. A state is a latent of the pipeline's layout; the grid is
    the pipeline's own sigmas for ``steps`` steps. ``cond`` of a rollout is the prompt's index; embeddings are
    computed once per prompt and cached.

    What this module adds: loading the pipeline (a local directory or a loaded pipeline), prompts from a file or a
    list, classifier-free guidance (``guidance_scale`` > 1: one batched forward on ``[uncond; cond]`` in rollouts
    and in training, the unconditional half detached in training as Flow-GRPO does), LoRA (Flow-GRPO's defaults
    r 32, alpha 64 on the attention projections of both streams; the KL reference is the transformer with the
    adapter disabled) or full fine-tuning (``lora_rank=None``; a frozen copy is the reference), bf16 autocast
    with float32 log-probabilities, gradient checkpointing, an EMA of the trained weights (used for evaluation
    and export), rewards on decoded images, per-prompt diversity and image grids of fixed evaluation prompts.

    Logged (besides the shared ``train/*`` and ``cost/*``): ``train/diversity`` (mean pairwise distance of
    ``diversity_features`` of the images within each group), ``train/reward_group_std`` and the components of a
    :class:`~entreg.flow.image_rewards.WeightedReward` (``train/reward/<name>``); every ``eval_every``
    iterations ``eval/reward``, ``eval/path_kl``, ``eval/diversity`` and ``eval/samples`` (the images of the
    evaluation prompts from fixed noise, ``eval_per_prompt`` per prompt).

    Args:
        pipeline: a pipeline directory (loaded with :func:`entreg.flow.pipeline.load_flow_pipeline`) or a
            loaded pipeline.
        reward: ``reward(images, prompts) -> (B,)`` on images in [0, 1] (:mod:`entreg.flow.image_rewards`).
        prompt_source: a prompt file (one per line), a table with ``prompt_column``, or a list of prompts.
        eval_prompts: prompts of the evaluation images (default: the first 4 training prompts).
        eval_per_prompt: evaluation images per prompt (``eval_samples`` is set to their total).
        height, width: image size.
        guidance_scale: CFG scale (<= 1: no CFG); ``embedded_guidance``: FLUX-dev's guidance embedding.
        negative_prompt: the unconditional prompt.
        detach_uncond: detach the unconditional branch in the training forward.
        lora_rank, lora_alpha, lora_targets: the adapter (``lora_rank=None``: full fine-tuning).
        autocast: bf16 autocast of the transformer; ``gradient_checkpointing``: the transformer's own.
        ema_decay: EMA of the trained parameters after every optimizer step (None: no EMA).
        offload: text encoders and VAE on the CPU between uses.
        torch_dtype: dtype to load the pipeline in (e.g. ``"bfloat16"``; the adapter stays float32).
        max_sequence_length: T5 tokens.
        diversity_features: ``images -> (B, D)`` features for the diversity metric (default
            :func:`pooled_pixels`; a CLIP image encoder is the usual choice at scale).
        grpo: the shared GRPO settings, with :class:`~entreg.modules.grpo.GRPOModule`'s defaults
            (:func:`entreg.modules.grpo.grpo_settings`) except ``group_size`` 12 (E-GRPO's G), ``prompts`` 2 and
            ``minibatches`` 1: ``variant``, ``steps``, ``noise_level``, ``tau``, ``active_steps``, ``group_size``,
            ``prompts``, ``clip_range``, ``kl_coef``, ``step_type``, ``adv_std``, ``micro_batch``, ``optimizer``,
            ``eval_every``, ``seed``, ...
    """

    def __init__(
        self,
        pipeline: str | Path | Any,
        reward: ImageReward,
        prompt_source: str | Path | Sequence[str],
        prompt_column: str = "prompt",
        eval_prompts: Sequence[str] | None = None,
        eval_per_prompt: int = 2,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 4.5,
        embedded_guidance: float = 3.5,
        negative_prompt: str = "",
        detach_uncond: bool = True,
        lora_rank: int | None = 32,
        lora_alpha: float = 64.0,
        lora_targets: Sequence[str] = ATTENTION_TARGETS,
        autocast: bool = False,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = None,
        offload: bool = True,
        torch_dtype: str | None = None,
        max_sequence_length: int = 256,
        diversity_features: Callable[[Tensor], Tensor] | None = None,
        **grpo: Any,
    ) -> None:
        super().__init__()
        settings = grpo_settings(grpo, group_size=12, prompts=2, minibatches=1)
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
        if eval_per_prompt < 1:
            raise ValueError(f"eval_per_prompt must be >= 1, got {eval_per_prompt}")
        texts = load_prompts(prompt_source, prompt_column)
        evaluation = list(eval_prompts) if eval_prompts is not None else texts[:4]
        optimizer = settings.pop("optimizer")
        self.save_hyperparameters(ignore=["pipeline", "reward", "prompt_source", "diversity_features", "grpo"])
        self.hparams.update(settings)
        self.hparams.pop("optimizer", None)  # a factory, not a hyperparameter
        self.hparams["pipeline"] = str(pipeline) if isinstance(pipeline, (str, Path)) else None
        self.hparams["eval_samples"] = len(evaluation) * eval_per_prompt
        if isinstance(pipeline, (str, Path)):
            pipeline = load_flow_pipeline(pipeline, torch_dtype)
        self.flow = PipelinePolicy(
            pipeline, height, width, guidance_scale, embedded_guidance, negative_prompt, max_sequence_length,
            offload, autocast,
        )  # fmt: skip
        self.init_grpo(self.flow.grid(settings["steps"]), optimizer)
        self.texts, self.n_train = [*texts, *evaluation], len(texts)
        self.reward, self.diversity_features = reward, diversity_features or pooled_pixels
        self.transformer = pipeline.transformer
        self.reference: list[nn.Module] | None = None
        if lora_rank is not None:
            with torch.random.fork_rng(devices=[]):  # the adapter's Gaussian init is seeded by ``seed``
                torch.manual_seed(settings["seed"])
                add_lora(self.transformer, lora_rank, lora_alpha, lora_targets)
        else:
            self.reference = [copy.deepcopy(self.transformer).requires_grad_(False).eval()]  # not a submodule
            self.transformer.requires_grad_(True)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.ema: list[Tensor] | None = None
        if ema_decay is not None:
            self.ema = [p.detach().clone() for p in self.trainable_parameters()]
        self.strict_loading = False  # checkpoints hold the trained parameters only (LoRA: the adapter)
        self._features: list[Tensor] | None = None
        self._eval_images: Tensor | None = None

    # --- the policy ------------------------------------------------------------------------------------------

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline (its transformer is the one trained here)."""
        return self.flow.pipeline

    def policy(self, reference: bool = False) -> Velocity:
        def velocity(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
            embeds = self.flow.embeddings([self.texts[i] for i in cond.tolist()], x.device)
            detach = self.hparams.detach_uncond and torch.is_grad_enabled()
            with self._reference() if reference else contextlib.nullcontext():
                transformer = self.reference[0] if reference and self.reference else self.transformer
                return self.flow.velocity(x, t.float(), embeds, transformer, detach)

        return velocity

    @contextlib.contextmanager
    def _reference(self) -> Iterator[None]:
        if self.reference is None:
            with adapter_disabled(self.transformer):
                yield
        else:
            self.reference[0].to(self.device)
            yield

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.flow.latent_shape)

    def draw_prompts(self, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.n_train, (self.hparams.prompts,), generator=generator).to(self.device)

    def eval_cond(self, n: int) -> Tensor:
        n_eval = len(self.texts) - self.n_train
        return (self.n_train + torch.arange(n) // self.hparams.eval_per_prompt % n_eval).to(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # --- rewards, metrics --------------------------------------------------------------------------------------

    def reward_of(self, samples: Tensor, cond: Tensor | None) -> Tensor:
        images = self.flow.decode(samples)
        rewards = self.reward(images, [self.texts[i] for i in cond.tolist()])
        if self._features is not None:
            if not self.scoring_coarse:  # diversity of the trained rollouts' images
                self._features.append(self.diversity_features(images).detach())
        else:
            self._eval_images = images
        return rewards

    def _collect(self) -> _Collected:
        self._features = []
        try:
            return super()._collect()
        except BaseException:
            self._features = None
            raise

    def train_metrics(self, collected: _Collected) -> dict[str, float]:
        features, self._features = torch.cat(self._features), None
        metrics = {"diversity": mean_pairwise_distance(features, collected.groups)}
        group_std = [collected.rewards[collected.groups == g].std() for g in collected.groups.unique()]
        metrics["reward_group_std"] = float(torch.stack(group_std).nanmean())
        for name, value in getattr(self.reward, "last", {}).items():
            metrics[f"reward/{name}"] = value
        return metrics

    def eval_metrics_of(self, samples: Tensor, cond: Tensor | None) -> dict[str, float]:
        images = self._eval_images if self._eval_images is not None else self.flow.decode(samples)
        return {"diversity": mean_pairwise_distance(self.diversity_features(images), cond)}

    def images_of(self, samples: Tensor) -> Tensor:
        return self._eval_images if self._eval_images is not None else self.flow.decode(samples)

    @torch.no_grad()
    def _evaluate(self) -> tuple[dict[str, float], Tensor]:
        with self.ema_weights():
            return super()._evaluate()

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int = 0, per_prompt: int = 1) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] of ``prompts`` by the ODE (the pipeline's Euler sampler, with its CFG)
        from noise seeded by ``seed``, ``per_prompt`` each (EMA weights when there is an EMA)."""
        from entreg.flow.plans import ode_plan
        from entreg.flow.rollout import rollout

        self.texts.extend(p for p in prompts if p not in self.texts)
        cond = torch.tensor([self.texts.index(p) for p in prompts], device=self.device).repeat_interleave(per_prompt)
        noise = torch.randn(len(cond), *self.sample_shape, generator=torch.Generator().manual_seed(seed))
        with self.ema_weights():
            x = rollout(self.policy(), noise.to(self.device), self.grid, ode_plan(self.hparams.steps), 1.0, cond)
        return self.flow.decode(x.sample)

    # --- EMA, export, checkpoints ------------------------------------------------------------------------------

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            params = [p.detach() for p in self.trainable_parameters()]
            torch._foreach_lerp_(self.ema, params, 1.0 - self.hparams.ema_decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the transformer inside the block (nothing changes without an EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.ema, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

    def save_lora(self, directory: str | Path) -> Path:
        """The adapter (EMA weights when there is an EMA) in diffusers' LoRA format: an unmodified pipeline
        reproduces this module's samples after ``pipeline.load_lora_weights(directory)``."""
        if self.hparams.lora_rank is None:
            raise ValueError("save_lora needs a LoRA run (lora_rank set); export_pipeline saves a full fine-tune")
        with self.ema_weights():
            return save_lora(type(self.pipeline), self.transformer, directory)

    def export_pipeline(self, directory: str | Path) -> Path:
        """A full pipeline with the fine-tuned transformer (the adapter fused into its weights) in ``directory``."""
        if self.hparams.lora_rank is None:
            with self.ema_weights():
                self.pipeline.save_pretrained(directory)
            return Path(directory)
        if self.hparams.pipeline is None:
            raise ValueError("export_pipeline of a LoRA run needs the pipeline's directory (pass pipeline=<dir>)")
        with tempfile.TemporaryDirectory() as lora:
            self.save_lora(lora)
            return export_merged(self.hparams.pipeline, lora, directory, torch_dtype=self.hparams.torch_dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        trained = {f"transformer.{n}" for n, p in self.transformer.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint[CHECKPOINT_KEY] = {"ema": None if self.ema is None else [e.clone() for e in self.ema]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError("not a GRPOPipelineModule checkpoint (it has no 'grpo_pipeline' entry)")
        super().on_load_checkpoint(checkpoint)
        ema = checkpoint[CHECKPOINT_KEY]["ema"]
        if (ema is None) != (self.ema is None):
            raise ValueError("the checkpoint and this module disagree on ema_decay (one has an EMA, the other not)")
        if ema is not None:
            self.ema = [e.to(self.device) for e in ema]

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema = [e.to(self.device) for e in self.ema]
