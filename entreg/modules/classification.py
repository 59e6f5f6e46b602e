"""Image classification with entropy-aware outputs and regularizers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from entreg.distributed import all_gather_uneven
from entreg.entropy import categorical_entropy
from entreg.loggers import log_histogram
from entreg.metrics import ClassificationMetrics
from entreg.modules.optimization import optimizer_config
from entreg.modules.skipping import SkipNonFiniteSteps
from entreg.modules.stage_metrics import PerDataloaderMetrics, log_stage_metrics
from entreg.nn.backbones import build_backbone
from entreg.nn.optim import OptimizerFactory, SchedulerFactory, optimizer_or_default
from entreg.nn.output import build_output_activation
from entreg.nn.penalties import ConfidencePenalty
from entreg.nn.snapshot import BufferSnapshot

__all__ = ["ClassificationModule"]

STAGES = ("train", "val", "test")


class ClassificationModule(SkipNonFiniteSteps):
    """A classifier = backbone (by name) + output activation (none or ERA) + cross-entropy with
    optional label smoothing and confidence penalty.

    Logs per stage (``train/``, ``val/``, ``test/``): accuracy, NLL, ECE (15 bins) and predictive
    entropy (mean/min/max) of the output distribution, plus a TensorBoard histogram of the
    validation entropies every validation epoch. A training batch whose loss is not finite (on
    any rank) is skipped with a warning and counted in ``train/skipped_steps``: the buffers it
    changed (BatchNorm statistics) are restored, it contributes zero gradient, and an optimizer
    step with no finite batch since the previous one leaves weights and optimizer state untouched.

    Args:
        backbone: name for :func:`entreg.nn.build_backbone` (``small_cnn``, ``resnet18``,
            ``resnet50`` or any timm model).
        num_classes: number of classes.
        in_chans: input channels.
        backbone_kwargs: extra arguments of the backbone (e.g. ``norm``, ``cifar_stem``, ``img_size``).
        pretrained: load the backbone's published weights (needs a network; off by default).
        output_activation: ``"none"`` or ``"era"`` (Entropy Regularizing Activation).
        output_activation_kwargs: its arguments, e.g. ``{"target_entropy": 0.6, "tau": 4.0}``.
        label_smoothing: epsilon of ``F.cross_entropy(label_smoothing=...)`` (training loss only).
        confidence_penalty: beta of :class:`entreg.nn.ConfidencePenalty` (0 disables it); the
            attribute ``confidence_penalty.coef`` can be adapted during training.
        confidence_hinge: optional hinge threshold Gamma of the confidence penalty.
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_: true``); default AdamW(lr=1e-3).
        scheduler: optional factory ``optimizer -> LRScheduler``, stepped every epoch.
        ece_bins: bins of the calibration error.

    Example:
        >>> model = ClassificationModule("small_cnn", num_classes=10, in_chans=1, output_activation="era")
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        num_classes: int = 10,
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        output_activation: str = "none",
        output_activation_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        confidence_penalty: float = 0.0,
        confidence_hinge: float | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        ece_bins: int = 15,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.backbone = build_backbone(backbone, num_classes, in_chans, pretrained, **dict(backbone_kwargs or {}))
        self.output_activation = build_output_activation(
            output_activation, num_classes, **dict(output_activation_kwargs or {})
        )
        self.confidence_penalty = ConfidencePenalty(confidence_penalty, confidence_hinge)
        self.label_smoothing = label_smoothing
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.train_metrics = ClassificationMetrics(num_classes, ece_bins)
        self.val_metrics = ClassificationMetrics(num_classes, ece_bins)
        self.test_metrics = ClassificationMetrics(num_classes, ece_bins)
        self._test_loaders = PerDataloaderMetrics(self.test_metrics)  # one per test dataloader (shifts)
        self._buffer_snapshot = BufferSnapshot(self)
        self._val_entropies: list[Tensor] = []

    def setup(self, stage: str) -> None:
        # Under ddp_spawn the metric states made in __init__ arrive in shared memory, so both ranks
        # would add into one storage: reset() gives each process its own fresh tensors.
        for name in STAGES:
            self.stage_metrics(name).reset()

    def forward(self, x: Tensor) -> Tensor:
        """Output logits: the backbone's logits after the output activation."""
        return self.output_activation(self.backbone(x))

    def stage_metrics(self, stage: str) -> ClassificationMetrics:
        """The metrics of ``stage`` (``train``, ``val`` or ``test``)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return getattr(self, f"{stage}_metrics")

    def compute_loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Training loss and per-sample entropy of the output logits: cross-entropy (with label
        smoothing) plus the confidence penalty."""
        entropy = categorical_entropy(logits)
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing) + self.confidence_penalty(entropy)
        return loss, entropy

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self._buffer_snapshot.save()
        logits = self(x)
        loss, entropy = self.compute_loss(logits, y)
        if not self.all_finite(loss):
            self._buffer_snapshot.restore()  # undo the batch's BatchNorm statistics
            return self.skip_batch(batch_idx)
        self.count_good_batch()
        self.train_metrics.update(logits, y, entropy)
        # averaged over ranks: equal-size rank batches give the global batch's value
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        h = entropy.detach().mean()
        self.log("train/entropy", h, on_step=True, on_epoch=False, batch_size=len(y), sync_dist=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, dataloader_idx: int = 0) -> Tensor:
        x, y = batch
        logits = self(x)
        if not self.all_finite(logits):
            rank_zero_warn(f"Non-finite {stage} logits: batch left out of the {stage} metrics.")
            return logits
        entropy = categorical_entropy(logits)
        metrics = self._test_loaders[dataloader_idx] if stage == "test" else self.stage_metrics(stage)
        metrics.update(logits, y, entropy)
        if stage == "val":
            self._val_entropies.append(entropy.detach())
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "test", dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def on_train_epoch_end(self) -> None:
        log_stage_metrics(self, self.train_metrics, "train")

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, self.val_metrics, "val")
        if self._val_entropies and not self.trainer.sanity_checking:
            values = all_gather_uneven(self.trainer.strategy, torch.cat(self._val_entropies))
            log_histogram(self.trainer, "val/entropy_hist", values)
        self._val_entropies.clear()

    def on_test_epoch_end(self) -> None:
        self._test_loaders.log(self)  # several test dataloaders (e.g. one per shift): Lightning's names

    def configure_optimizers(self) -> Any:
        make_optimizer = optimizer_or_default(self.optimizer_factory, torch.optim.AdamW, lr=1e-3)
        return optimizer_config(make_optimizer(self.parameters()), self.scheduler_factory, "epoch")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["entreg_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("entreg_skipped_steps", 0))
