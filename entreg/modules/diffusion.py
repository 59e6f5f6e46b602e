"""DDPM-style training of a denoiser (diffusers ``UNet2DModel`` or an MLP) with EMA weights, sampled with any
diffusers scheduler."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entreg.diffusion.metrics import FeatureFrechetDistance, sliced_wasserstein
from entreg.modules.ema import EMATrainedNetwork, OptimizerFactory
from entreg.nn.denoisers import denoiser_from_checkpoint
from entreg.nn.optim import SchedulerFactory

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "DiffusionModule",
    "sample_metrics",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
# short names of samplers: scheduler class and the options that differ from its defaults
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmsolver": ("diffusers.DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "evodiff": ("entreg.diffusion.evodiff.EVODiffScheduler", {}),
    "ddim": ("diffusers.DDIMScheduler", {"timestep_spacing": "trailing"}),
    "euler": ("diffusers.EulerDiscreteScheduler", {}),
    "unipc": ("diffusers.UniPCMultistepScheduler", {}),
}
# the training noise settings every sampling scheduler shares
NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def _locate(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@torch.no_grad()
def sample_metrics(
    samples: Tensor, real: Tensor, feature_extractor: nn.Module | None = None, reference_mixture: Any | None = None
) -> dict[str, float]:
    """Quality of ``samples`` against ``real`` data: ``fd`` (images, with a feature extractor, run on its own
    device: :class:`~entreg.diffusion.metrics.FeatureFrechetDistance`), ``log_likelihood`` (vectors, with a
    reference mixture) and ``sliced_wasserstein`` (vectors, over as many points of each as the smaller set has)."""
    metrics: dict[str, float] = {}
    if samples.ndim > 2 and feature_extractor is not None:
        metrics["fd"] = FeatureFrechetDistance(feature_extractor, real)(samples)
    if samples.ndim == 2:
        if reference_mixture is not None:
            metrics["log_likelihood"] = float(reference_mixture.log_prob(samples.double().cpu()).mean())
        m = min(len(samples), len(real))
        generator = torch.Generator().manual_seed(0)
        metrics["sliced_wasserstein"] = float(sliced_wasserstein(samples[:m].cpu(), real[:m].cpu(), 512, generator))
    return metrics


class DiffusionModule(EMATrainedNetwork):
    """Diffusion training: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with DDPM's noise schedule, the
    denoiser regressing eps, x_0 or v (MSE). An exponential moving average of the weights (``self.ema``,
    a ``torch.optim.swa_utils.AveragedModel``, in the checkpoint) is updated after every training batch
    and is what :meth:`sample` and validation use.

    A training batch whose loss is not finite (on any rank) is skipped with a warning: it contributes zero
    gradient, and an optimizer step with no finite batch since the previous one leaves weights, optimizer
    state and EMA untouched (counted in ``train/skipped_steps``).

    Validation logs ``val/loss`` (EMA weights, fixed noise) and, every ``sample_every_n_epochs`` epochs,
    samples ``num_val_samples`` points from fixed noise and logs :meth:`sample_metrics` against the
    validation data: ``val/fd`` (Frechet distance of ``feature_extractor`` features, for images),
    ``val/log_likelihood`` (mean log-density under ``reference_mixture``) and ``val/sliced_wasserstein``
    (for vectors), and ``val/samples`` to TensorBoard (:func:`entreg.modules.ema.log_samples`: an image grid,
    or the 2-D histogram of 2-D points).

    Args:
        denoiser: ``denoiser(x_t, t) -> prediction`` of ``x_t``'s shape, e.g.
            :class:`entreg.nn.denoisers.MLPDenoiser` or :func:`entreg.nn.denoisers.unet2d`.
        prediction_type: ``"epsilon"``, ``"sample"`` (x_0) or ``"v_prediction"``.
        num_train_timesteps: diffusion steps of the training schedule.
        beta_schedule: diffusers' beta schedule (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``).
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_: true``); default AdamW(lr=1e-3).
        scheduler: optional factory ``optimizer -> LRScheduler`` (Hydra ``_partial_: true``), e.g.
            ``CosineAnnealingLR`` with ``T_max`` the number of optimizer steps.
        scheduler_interval: step the scheduler every optimizer ``"step"`` (default) or every ``"epoch"``.
        ema_decay: decay of the EMA weights, in [0, 1), reached after a warm-up: update n uses
            min(ema_decay, (1 + n) / (10 + n)), as diffusers' EMAModel does, so short fits are not
            sampled from weights near the initialisation.
        sample_scheduler: sampler of validation samples: a name of :data:`SAMPLERS` (``dpmsolver``,
            ``evodiff``, ``ddim``, ``euler``, ``unipc``) or a scheduler class path.
        sample_steps: its number of inference steps (NFE).
        sample_every_n_epochs: sample at validation every this many epochs (0: never).
        num_val_samples: samples (and validation points) compared at validation.
        feature_extractor: frozen ``nn.Module`` mapping images to features for the Frechet distance (not
            saved in checkpoints), e.g. :func:`entreg.data.digits_nets.digits_feature_extractor`.
        reference_mixture: the true :class:`entreg.diffusion.GaussianMixture` of vector data.
        data_range: (low, high) of the data, mapped to [0, 1] for images (:meth:`to_image`).

    Example:
        >>> from entreg.nn.denoisers import MLPDenoiser
        >>> model = DiffusionModule(MLPDenoiser(dim=2, hidden=16), prediction_type="v_prediction")
        >>> model.sample(4, "ddim", num_inference_steps=3).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        denoiser: nn.Module,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        ema_decay: float = 0.999,
        sample_scheduler: str = "dpmsolver",
        sample_steps: int = 20,
        sample_every_n_epochs: int = 1,
        num_val_samples: int = 64,
        feature_extractor: nn.Module | None = None,
        reference_mixture: Any | None = None,
        data_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if sample_scheduler not in SAMPLERS and "." not in sample_scheduler:
            raise ValueError(
                f"sample_scheduler must be one of {tuple(SAMPLERS)} or a scheduler class path, got {sample_scheduler!r}"
            )
        if sample_steps < 1 or sample_every_n_epochs < 0 or num_val_samples < 2:
            raise ValueError(
                "need sample_steps >= 1, sample_every_n_epochs >= 0 and num_val_samples >= 2; got "
                f"{sample_steps}, {sample_every_n_epochs}, {num_val_samples}"
            )
        self.save_hyperparameters(
            ignore=["denoiser", "optimizer", "scheduler", "feature_extractor", "reference_mixture"]
        )
        self.denoiser = denoiser
        self.init_training(denoiser, ema_decay, optimizer, data_range, scheduler, scheduler_interval)
        self.feature_extractor = feature_extractor.eval().requires_grad_(False) if feature_extractor else None
        self.reference_mixture = reference_mixture
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            clip_sample=False,
        )
        self.prediction_type = prediction_type
        self.sample_scheduler, self.sample_steps = sample_scheduler, sample_steps
        self.sample_every_n_epochs, self.num_val_samples = sample_every_n_epochs, num_val_samples
        self._val_real: list[Tensor] = []

    @classmethod
    def load_checkpoint(cls, path: str | Path, map_location: Any = "cpu", **kwargs: Any) -> DiffusionModule:
        """Load a checkpoint written by Lightning, rebuilding an entreg denoiser from the spec stored in it
        (pass ``denoiser=`` for any other). ``kwargs`` go to ``load_from_checkpoint`` (e.g.
        ``feature_extractor``, ``reference_mixture``)."""
        if kwargs.get("denoiser") is None:
            kwargs["denoiser"] = denoiser_from_checkpoint(path)
        return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, **kwargs)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The (raw, trained) denoiser's prediction for noisy ``x`` at timesteps ``t``."""
        return self.denoiser(x, t)

    # ---- training ---------------------------------------------------------------------------------------

    def prediction_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser regresses at timesteps ``t``: the noise, ``x0`` or the velocity
        ``sqrt(abar) eps - sqrt(1 - abar) x0``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.noise_scheduler.get_velocity(x0, noise, t)

    def diffusion_loss(self, denoiser: nn.Module, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """MSE of ``denoiser`` on ``x0`` noised at uniform random timesteps (seeded by ``generator``, a CPU
        generator, when given)."""
        device = x0.device if generator is None else "cpu"
        noise = torch.randn(x0.shape, generator=generator, device=device).to(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (len(x0),), generator=generator, device=device)
        t = t.to(x0.device)
        prediction = denoiser(self.noise_scheduler.add_noise(x0, noise, t), t)
        return F.mse_loss(prediction.float(), self.prediction_target(x0, noise, t).float())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = _data(batch)
        loss = self.diffusion_loss(self.denoiser, x0)
        return self.loss_step(loss, batch_idx, len(x0))

    def trained_network(self) -> nn.Module:
        return self.denoiser

    # ---- sampling ---------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, **options: Any) -> Any:
        """A diffusers scheduler with the training noise schedule and prediction type: ``name`` is one of
        :data:`SAMPLERS` or a scheduler class path (``diffusers.DEISMultistepScheduler``); ``options``
        override its config (e.g. ``solver_order=3``)."""
        path, defaults = SAMPLERS.get(name, (name, {}))
        if "." not in path:
            raise ValueError(f"unknown sampler {name!r}: use one of {tuple(SAMPLERS)} or a scheduler class path")
        config = {key: self.noise_scheduler.config[key] for key in NOISE_KEYS}
        return _locate(path).from_config({**config, **defaults, **options})

    @torch.no_grad()
    def sample(
        self,
        n: int,
        scheduler: Any = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        shape: Sequence[int] | None = None,
    ) -> Tensor:
        """``n`` samples from the EMA denoiser, (n, *shape), by
        :func:`entreg.diffusion.evaluation.run_solver`.

        Args:
            n: number of samples.
            scheduler: a diffusers scheduler instance (its prediction type must match), a sampler name
                (:meth:`make_scheduler`) or None for ``sample_scheduler``.
            num_inference_steps: model evaluations; ``sample_steps`` by default.
            generator: seeds the initial noise (drawn on the generator's device) and stochastic schedulers.
            shape: the shape of one sample; the denoiser's ``sample_shape`` by default.
        """
        from entreg.diffusion.evaluation import run_solver

        if scheduler is None or isinstance(scheduler, str):
            scheduler = self.make_scheduler(scheduler or self.sample_scheduler)
        predicts = scheduler.config.get("prediction_type")
        if predicts != self.prediction_type:
            raise ValueError(
                f"the scheduler expects {predicts!r} predictions; this model predicts {self.prediction_type!r}"
            )
        shape = self.sample_shape if shape is None else tuple(shape)
        noise_device = self.device if generator is None else generator.device
        noise = torch.randn((n, *shape), generator=generator, device=noise_device).to(self.device)
        denoiser = self.ema.module
        was_training = denoiser.training

        def model(x: Tensor, t: Tensor) -> Tensor:
            return denoiser(x, t.expand(n))

        denoiser.eval()
        try:
            return run_solver(scheduler, model, noise, num_inference_steps or self.sample_steps, generator, False)
        finally:
            denoiser.train(was_training)

    def sample_metrics(self, samples: Tensor, real: Tensor) -> dict[str, float]:
        """:func:`sample_metrics` with this module's feature extractor and reference mixture."""
        return sample_metrics(samples, real, self.feature_extractor, self.reference_mixture)

    # ---- validation ---------------------------------------------------------------------------------------

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = _data(batch)
        loss = self.diffusion_loss(self.ema.module, x0, torch.Generator().manual_seed(batch_idx))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x0), sync_dist=True)
        held = sum(len(x) for x in self._val_real)
        if held < self.num_val_samples:
            self._val_real.append(x0[: self.num_val_samples - held].detach())
        return loss

    def on_validation_epoch_end(self) -> None:
        real = torch.cat(self._val_real) if self._val_real else None
        self._val_real.clear()
        every = self.sample_every_n_epochs
        if real is None or self.trainer.sanity_checking or not every or (self.current_epoch + 1) % every:
            return
        samples = self.sample(len(real), generator=torch.Generator().manual_seed(0), shape=real.shape[1:])
        self.log_validation_samples(samples, self.sample_metrics(samples, real))


def _data(batch: Any) -> Tensor:
    """The data tensor of a batch: the batch itself or its first entry (labels are ignored)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
