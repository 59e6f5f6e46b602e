"""The training loop shared by the generative modules: one network trained on a loss, its non-finite batches
skipped, an EMA copy updated after every finite batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from entreg.images import sample_grid
from entreg.loggers import has_tensorboard
from entreg.modules.optimization import check_interval, optimizer_config
from entreg.modules.skipping import SkipNonFiniteSteps
from entreg.nn.optim import OptimizerFactory, SchedulerFactory, optimizer_or_default

__all__ = ["FEATURE_EXTRACTOR_PREFIX", "EMATrainedNetwork", "OptimizerFactory", "log_samples", "warmed_up_ema"]

FEATURE_EXTRACTOR_PREFIX = "feature_extractor."


def log_samples(trainer: Any, samples: Tensor, to_image: Callable[[Tensor], Tensor], tag: str = "val/samples") -> None:
    """On rank zero, add ``samples`` to every TensorBoard logger of ``trainer`` as one image
    (:func:`entreg.images.sample_grid`): a grid of the first 64 images (``to_image`` maps them to [0, 1]) or the
    2-D histogram of vectors (their first two coordinates)."""
    if samples.ndim not in (2, 4) or not has_tensorboard(trainer) or not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    image = sample_grid(to_image(samples[:64]) if samples.ndim == 4 else samples)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, trainer.global_step)


def warmed_up_ema(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """An ``AveragedModel`` update whose decay at update n is min(decay, (1 + n) / (10 + n))."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = num_averaged.to(averaged[0].dtype)  # stays on the device: no host sync per step
        torch._foreach_lerp_(averaged, current, 1.0 - ((1.0 + n) / (10.0 + n)).clamp(max=decay))

    return update


class EMATrainedNetwork(SkipNonFiniteSteps):
    """Base of :class:`~entreg.modules.diffusion.DiffusionModule` and :class:`~entreg.modules.flow.FlowMatchingModule`:
    subclasses call :meth:`init_training`, return the trained network from :meth:`trained_network` and end
    ``training_step`` with :meth:`loss_step`."""

    optimizer_factory: OptimizerFactory | None
    scheduler_factory: SchedulerFactory | None
    scheduler_interval: str
    ema: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._skipped_batch = False

    def trained_network(self) -> nn.Module:
        raise NotImplementedError

    def init_training(
        self,
        network: nn.Module,
        ema_decay: float,
        optimizer: OptimizerFactory | None,
        data_range: Sequence[float],
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        """Validate and set the EMA copy of ``network`` (``self.ema``, with :func:`warmed_up_ema`), the optimizer
        factory, the learning-rate scheduler factory (``optimizer -> LRScheduler``, or None) stepped every
        ``scheduler_interval`` (``"step"``: every optimizer step, ``"epoch"``) and ``self.data_range`` (low, high)
        of the data."""
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        low, high = (float(v) for v in data_range)
        if not low < high:
            raise ValueError(f"data_range must be (low, high) with low < high, got {tuple(data_range)}")
        self.ema = AveragedModel(network, multi_avg_fn=warmed_up_ema(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.optimizer_factory, self.data_range = optimizer, (low, high)
        self.scheduler_factory, self.scheduler_interval = scheduler, check_interval(scheduler_interval)

    def loss_step(self, loss: Tensor, batch_idx: int, batch_size: int) -> Tensor:
        """Log ``train/loss`` and return it, or skip the batch on every rank when it is not finite."""
        self._skipped_batch = not self.all_finite(loss)
        if self._skipped_batch:
            return self.skip_batch(batch_idx)
        self.count_good_batch()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._skipped_batch:
            self.ema.update_parameters(self.trained_network())

    def configure_optimizers(self) -> Any:
        make_optimizer = optimizer_or_default(self.optimizer_factory, torch.optim.AdamW, lr=1e-3)
        optimizer = make_optimizer(self.trained_network().parameters())
        return optimizer_config(optimizer, self.scheduler_factory, self.scheduler_interval)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: the trained network's ``sample_shape``."""
        network = self.trained_network()
        shape = getattr(network, "sample_shape", None)
        if shape is None:
            raise ValueError(f"{type(network).__name__} has no sample_shape: pass shape= to sample()")
        return tuple(shape)

    def to_image(self, x: Tensor) -> Tensor:
        """Samples mapped from ``data_range`` to [0, 1] (clamped), for image grids and files."""
        low, high = self.data_range
        return ((x - low) / (high - low)).clamp(0.0, 1.0)

    def log_validation_samples(self, samples: Tensor, metrics: dict[str, float]) -> None:
        """Log ``metrics`` of validation ``samples`` as ``val/*`` and the samples to TensorBoard."""
        self.log_dict({f"val/{name}": value for name, value in metrics.items()}, sync_dist=True)
        log_samples(self.trainer, samples, self.to_image)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the skipped-step count and the trained network's ``spec()`` (when it has one); drop the
        feature extractor (an evaluation tool, not part of the model)."""
        checkpoint["entreg_skipped_steps"] = self.skipped_steps
        network = self.trained_network()
        if callable(getattr(network, "spec", None)):
            checkpoint["entreg_denoiser"] = network.spec()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FEATURE_EXTRACTOR_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep this module's own ``feature_extractor`` (if any) and restore the skipped-step count."""
        extractor = getattr(self, "feature_extractor", None)
        if extractor is not None:
            state = {FEATURE_EXTRACTOR_PREFIX + k: v for k, v in extractor.state_dict().items()}
            checkpoint["state_dict"].update(state)
        self.skipped_steps = int(checkpoint.get("entreg_skipped_steps", 0))
