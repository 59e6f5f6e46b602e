"""EntropyMonitor: log the predictive (and representation) entropy of any LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from entreg.callbacks.entropy_stats import EntropyStats
from entreg.callbacks.output_capture import OutputCapture, OutputKey
from entreg.distributed import all_gather_uneven, settle_logged_metrics
from entreg.distributions import CategoricalFormat, categorical_entropy_of
from entreg.entropy import spectral_entropy
from entreg.loggers import has_tensorboard, log_histogram, log_metrics, logging_step, should_log_step

__all__ = ["EntropyMonitor"]

STAGES = ("train", "val", "test", "predict")
MAX_FEATURE_DIM = 4096  # the representation entropy accumulates a d x d matrix


class EntropyMonitor(L.Callback):
    """Log the predictive entropy of a model's outputs, per stage, for any LightningModule.

    A forward hook on the submodule ``module`` (default: the LightningModule's own forward) reads
    the first output it produces in each batch, with no change to the model's code. Logged (in
    nats, reduced over all DDP ranks, so they equal one process on the global batch):

    * ``train/{name}``: mean entropy of the training batch, every ``log_every_n_steps`` steps;
    * ``{stage}/{name}_mean``, ``_min``, ``_max`` per epoch for each monitored stage
      (``train``, ``val``, ``test``; ``predict`` goes to the loggers directly), and
      ``{stage}/{name}_nonfinite`` when NaN/Inf entropies were left out;
    * a TensorBoard histogram ``{stage}/{name}_hist``: of the training batch every
      ``histogram_every_n_steps`` steps, and of all values of each val/test/predict epoch;
    * with ``features`` set, ``{stage}/repr_entropy``: the von Neumann entropy (Kim et al.,
      CVPR 2023) of that layer's L2-normalised features over the whole epoch (exact under DDP:
      the d x d autocorrelation is summed over batches and ranks). Point it at a pooled layer.

    The hooks are attached only during batches of monitored stages: other stages pay nothing.

    Args:
        module: dotted name of the submodule whose output holds the logits (e.g. ``"backbone.fc"``);
            ``None``: the LightningModule's own ``forward``.
        output_key: key/index/attribute of a dict, tuple or object output (e.g. ``"logits"``, ``0``).
        input_format: ``"logits"`` (log-probabilities also work) or ``"probs"``.
        class_dim: dimension of the classes (``1`` for segmentation maps); other dimensions are samples.
        stages: which of ``train``, ``val``, ``test``, ``predict`` to monitor.
        histogram_every_n_steps: training-histogram period in optimizer steps; 0 turns all histograms off.
        features: dotted name of the layer for the representation entropy (``None``: off).
        features_key: key/index/attribute of that layer's output.
        name: metric name stem.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
        ...                     callbacks=[EntropyMonitor()], enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        ['val/pred_entropy_max', 'val/pred_entropy_mean', 'val/pred_entropy_min']
    """

    def __init__(
        self,
        module: str | None = None,
        output_key: OutputKey = None,
        input_format: CategoricalFormat = "logits",
        class_dim: int = -1,
        stages: Sequence[str] = ("train", "val", "test"),
        histogram_every_n_steps: int = 50,
        features: str | None = None,
        features_key: OutputKey = None,
        name: str = "pred_entropy",
    ) -> None:
        if input_format not in ("logits", "probs"):
            raise ValueError(f"input_format must be 'logits' or 'probs', got {input_format!r}")
        stages = tuple(stages)
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages or len(set(stages)) != len(stages):
            raise ValueError(f"stages must be distinct names among {STAGES}, got {list(stages)}")
        if not isinstance(histogram_every_n_steps, int) or histogram_every_n_steps < 0:
            raise ValueError(f"histogram_every_n_steps must be an int >= 0 (0 = off), got {histogram_every_n_steps!r}")
        if not name or "/" in name:
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        self.module, self.output_key, self.features = module, output_key, features
        self.input_format, self.class_dim, self.stages = input_format, class_dim, stages
        self.histogram_every_n_steps, self.name = histogram_every_n_steps, name
        self._capture = OutputCapture(module, output_key, self._on_output)
        self._feature_capture = OutputCapture(features, features_key, self._on_features) if features else None
        self._stats: dict[str, EntropyStats] = {}
        self._grams: dict[str, Tensor] = {}
        self._loaded: dict[str, Any] | None = None
        self._stage: str | None = None  # the stage whose batch is running with hooks attached
        self._batch_entropy: Tensor | None = None
        self._log_step = False
        self._histograms = False
        self._last_histogram_step = -1
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, output_key=self.output_key, name=self.name)

    # --- setup and state -------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._capture.bind(pl_module)  # a wrong name fails here, before any step
        if self._feature_capture is not None:
            self._feature_capture.bind(pl_module)
        device = trainer.strategy.root_device
        # new tensors in every process: under ddp_spawn, tensors built before the launch are shared memory
        self._stats = {s: EntropyStats(device) for s in self.stages}
        self._grams = {}
        self._histograms = self.histogram_every_n_steps > 0 and has_tensorboard(trainer)
        if self._loaded is not None:
            self._apply_state(self._loaded)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": {s: stats.state_dict() for s, stats in self._stats.items()},
            "grams": {s: gram.cpu() for s, gram in self._grams.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict
        if self._stats:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        for stage, stats in state["stats"].items():
            if stage in self._stats:
                self._stats[stage].load_state_dict(stats)
        device = next(iter(self._stats.values())).device
        self._grams = {s: g.to(device=device, copy=True) for s, g in state["grams"].items()}
        self._loaded = None

    # --- capture ---------------------------------------------------------------------------

    def _on_output(self, output: Tensor) -> None:
        h = categorical_entropy_of(output, self.input_format, self.class_dim).reshape(-1)
        self._batch_entropy = h
        self._stats[self._stage].update(h)

    def _on_features(self, features: Tensor) -> None:
        z = features.flatten(1).float()
        if z.shape[1] > MAX_FEATURE_DIM:
            raise ValueError(
                f"EntropyMonitor: features of {self.features!r} have dimension {z.shape[1]} > {MAX_FEATURE_DIM}; "
                "point `features` at a pooled layer (e.g. the global pool before the classifier)"
            )
        z = torch.nn.functional.normalize(z, dim=1)
        gram = (z.T @ z).double()  # the product in float32, the sum over batches and ranks in float64
        self._grams[self._stage] = self._grams[self._stage] + gram if self._stage in self._grams else gram

    def _batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        self._stage, self._batch_entropy = stage, None
        self._log_step = stage == "train" and should_log_step(trainer)
        self._capture.attach()
        if self._feature_capture is not None:
            self._feature_capture.attach()

    def _batch_end(self, stage: str) -> bool:
        """Detach the hooks; whether this batch was monitored."""
        if self._stage != stage:
            return False
        self._capture.detach()
        if self._feature_capture is not None:
            self._feature_capture.detach()
        self._stage = None
        if self._capture.calls == 0 and not self._warned:
            self._warned = True
            where = f"submodule {self.module!r}" if self.module else "the module's forward"
            rank_zero_warn(
                f"EntropyMonitor: {where} was not called during a {stage} batch, so nothing was measured. "
                "Set `module=` to the submodule that produces the logits."
            )
        return True

    # --- logging ---------------------------------------------------------------------------

    def _log_train_step(self, trainer: L.Trainer) -> None:
        """The batch's mean entropy on Lightning's logging steps (``log_every_n_steps``), written
        straight to the loggers: ``self.log`` would cost ~0.5 ms on every step."""
        step, device = logging_step(trainer), trainer.strategy.root_device
        h = self._batch_entropy if self._batch_entropy is not None else torch.empty(0, device=device)
        if self._log_step:
            batch = EntropyStats(device)
            batch.update(h)
            mean, count = batch.reduced_mean(trainer.strategy)
            if count > 0:
                log_metrics(trainer, {f"train/{self.name}": mean.item()}, step)
        if self._histograms and step % self.histogram_every_n_steps == 0 and step != self._last_histogram_step:
            self._last_histogram_step = step
            log_histogram(trainer, f"train/{self.name}_hist", all_gather_uneven(trainer.strategy, h.float()), step)

    def _log_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        settle_logged_metrics(trainer)  # the rank-0 progress bar's reductions come first on every rank
        strategy = trainer.strategy
        stats = self._stats[stage].reduced(strategy)
        values = self._stats[stage].values()  # for the histogram
        self._stats[stage].reset()
        metrics: dict[str, float] = {}
        if stats["count"] > 0:
            metrics |= {f"{stage}/{self.name}_{k}": stats[k].item() for k in ("mean", "min", "max")}
        if stats["nonfinite"] > 0:
            metrics[f"{stage}/{self.name}_nonfinite"] = stats["nonfinite"].item()
        if self._feature_capture is not None:
            metrics |= self._representation_entropy(strategy, stage)
        if self._histograms and stage != "train":
            values = all_gather_uneven(strategy, values[torch.isfinite(values)].float())
            if values.numel():
                log_histogram(trainer, f"{stage}/{self.name}_hist", values)
        if not metrics:
            return
        if stage == "predict":  # self.log is not available in predict hooks
            log_metrics(trainer, metrics)
        else:
            # already reduced over ranks: sync_dist averages identical values and keeps Lightning from warning
            pl_module.log_dict(metrics, sync_dist=True)

    def _representation_entropy(self, strategy: Any, stage: str) -> dict[str, float]:
        gram = self._grams.pop(stage, None)
        if strategy.world_size > 1:  # a rank that saw no batch joins with zeros of the agreed size
            size = torch.tensor([0 if gram is None else gram.shape[0]], device=strategy.root_device)
            size = int(strategy.reduce(size, reduce_op="max").item())
            if size == 0:
                return {}
            if gram is None:
                gram = torch.zeros(size, size, dtype=torch.float64, device=strategy.root_device)
            gram = strategy.reduce(gram, reduce_op="sum")
        if gram is None or gram.trace() == 0:
            return {}
        return {f"{stage}/repr_entropy": spectral_entropy(gram).item()}

    # --- Lightning hooks -------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start(trainer, pl_module, "train")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_end("train"):
            self._log_train_step(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "train")

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, "val")

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("val")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "val")

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, "test")

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("test")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "test")

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, "predict")

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end("predict")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "predict")
