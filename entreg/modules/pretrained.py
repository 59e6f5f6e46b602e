"""PretrainedClassifier: a pretrained network (timm, torchvision, RobustBench, or an entreg-train checkpoint) as
a LightningModule to test and adapt, e.g. with :class:`entreg.callbacks.TestTimeAdaptation`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from entreg.metrics import ClassificationMetrics
from entreg.modules.stage_metrics import PerDataloaderMetrics
from entreg.nn.pretrained import DataConfig, NormalizedClassifier, timm_model, torchvision_model

__all__ = ["PretrainedClassifier"]


class PretrainedClassifier(L.LightningModule):
    """A pretrained classifier that takes images in [0, 1] at the network's input size: the normalisation
    (``data_config.mean``/``std``) and the optional ``class_subset`` happen inside :attr:`net`
    (a :class:`~entreg.nn.pretrained.NormalizedClassifier` around the network, ``net.model``), so test-time
    adaptation of ``net`` (``TestTimeAdaptation(module="net")``) or of the whole module sees the same logits.

    ``test_step`` logs, per test dataloader (one per domain), the metrics of
    :class:`entreg.metrics.ClassificationMetrics` as ``ClassificationModule`` names them (``test/acc``, ``test/nll``,
    ``test/ece``, ``test/entropy_*``; with several dataloaders ``test/acc/dataloader_idx_<i>``) plus
    ``test/error`` = 1 - acc; ``predict_step`` returns the logits. :meth:`image_transform` is the preprocessing
    of the images before the model (resize, centre crop, [0, 1] tensor; no normalisation).

    Build one with :meth:`timm`, :meth:`torchvision`, :meth:`robustbench` or :meth:`from_entreg_checkpoint`, or
    from any network.

    Args:
        net: the network: images normalised with ``data_config`` -> logits.
        data_config: its preprocessing (:class:`~entreg.nn.pretrained.DataConfig` or a mapping of its fields;
            ``None``: none).
        num_classes: logits of ``net``; default ``net.num_classes`` (timm, RobustBench) or, failing that, the width
            of the logits of one forward pass at ``data_config.input_size``.
        class_subset: keep only these logits (label j = class ``class_subset[j]``), e.g. ImageNet-R's 200 classes
            of ImageNet's 1000; ``hparams.num_classes`` is then ``len(class_subset)``.
        ece_bins: bins of the calibration error.
        source: where the weights came from (kept in ``hparams``, printed by tools).

    Example:
        >>> from entreg.nn.robustbench import WideResNet
        >>> model = PretrainedClassifier(WideResNet(depth=10, widen_factor=1), {"input_size": (3, 32, 32)},
        ...                              class_subset=[3, 5])
        >>> model(torch.rand(2, 3, 32, 32)).shape, model.hparams.num_classes, model.hparams.source_classes
        (torch.Size([2, 2]), 2, 10)
    """

    def __init__(
        self,
        net: nn.Module,
        data_config: DataConfig | Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        class_subset: Sequence[int] | None = None,
        ece_bins: int = 15,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.data_config = DataConfig.coerce(data_config)
        source_classes = num_classes or getattr(net, "num_classes", None) or self._classes_of(net)
        if not isinstance(source_classes, int) or source_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {source_classes!r}")
        subset = None if class_subset is None else [int(c) for c in class_subset]
        if subset is not None and not all(0 <= c < source_classes for c in subset):
            bad = [c for c in subset if not 0 <= c < source_classes]
            raise ValueError(f"class_subset indices must be in [0, {source_classes}), got {bad[:10]}")
        self.net = NormalizedClassifier(net, self.data_config.mean, self.data_config.std, subset)
        num_outputs = len(subset) if subset is not None else source_classes
        self.save_hyperparameters(
            {
                "num_classes": num_outputs,
                "source_classes": source_classes,
                "class_subset": subset,
                "data_config": self.data_config.as_dict(),
                "ece_bins": ece_bins,
                "source": dict(source or {}),
            }
        )
        self._test_metrics: PerDataloaderMetrics | None = None  # made when testing starts

    def _classes_of(self, net: nn.Module) -> int:
        size = self.data_config.input_size
        if size is None:
            raise ValueError("pass num_classes: the network has no num_classes attribute and data_config no input_size")
        was_training = net.training
        with torch.no_grad():
            width = net.eval()(torch.zeros(1, *size)).shape[-1]
        net.train(was_training)
        return int(width)

    # ---- builders ------------------------------------------------------------------------------------------

    @classmethod
    def timm(
        cls, name: str, file: str | Path, num_classes: int | None = None, class_subset: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> PretrainedClassifier:  # fmt: skip
        """A timm model with weights from ``file`` (:func:`entreg.nn.pretrained.timm_model`; ``kwargs`` go to
        ``timm.create_model``) and the preprocessing of its pretrained config."""
        net, data = timm_model(name, file, num_classes, **kwargs)
        source = {"kind": "timm", "name": name, "file": str(file)}
        return cls(net, data, net.num_classes, class_subset, source=source)

    @classmethod
    def torchvision(
        cls, name: str, file: str | Path, weights: str | None = None, num_classes: int | None = None,
        class_subset: Sequence[int] | None = None, **kwargs: Any,
    ) -> PretrainedClassifier:  # fmt: skip
        """A torchvision model with weights from ``file`` (:func:`entreg.nn.pretrained.torchvision_model`): the
        preprocessing of the torchvision weights entry ``weights`` (default ``IMAGENET1K_V1``)."""
        net, data = torchvision_model(name, file, weights, num_classes, **kwargs)
        source = {"kind": "torchvision", "name": name, "file": str(file), "weights": weights}
        return cls(net, data, net.num_classes, class_subset, source=source)

    @classmethod
    def robustbench(
        cls, name: str, dataset: str = "cifar10", file: str | Path = "", class_subset: Sequence[int] | None = None,
        weights_only: bool = True,
    ) -> PretrainedClassifier:  # fmt: skip
        """A RobustBench CIFAR corruption model from its checkpoint (:func:`entreg.nn.robustbench.load_robustbench`):
        32x32 inputs in [0, 1], no outside normalisation."""
        from entreg.nn.robustbench import robustbench_model

        net, data = robustbench_model(name, dataset, file, weights_only=weights_only)
        source = {"kind": "robustbench", "name": name, "dataset": dataset, "file": str(file)}
        return cls(net, data, net.num_classes, class_subset, source=source)

    @classmethod
    def from_entreg_checkpoint(
        cls, path: str | Path, class_subset: Sequence[int] | None = None
    ) -> PretrainedClassifier:
        """The classifier of an ``entreg-train`` checkpoint (a ``ClassificationModule``: backbone and output
        activation), fed the images as its datamodule gives them (no resize, no normalisation)."""
        from entreg.modules.classification import ClassificationModule

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"entreg checkpoint {str(path)!r} does not exist (an entreg-train .ckpt)")
        trained = ClassificationModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        net = nn.Sequential(trained.backbone, trained.output_activation).eval()
        num_classes = int(trained.hparams.num_classes)
        source = {"kind": "entreg", "file": str(path), "backbone": trained.hparams.backbone}
        return cls(net, None, num_classes, class_subset, ece_bins=trained.hparams.ece_bins, source=source)

    # ---- use -----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images ``x`` in [0, 1] (N, C, H, W) at the network's input size."""
        return self.net(x)

    def image_transform(self, resize: bool = True) -> Any:
        """PIL image (or uint8 array/tensor) -> float tensor in [0, 1]: resize and centre crop as the network was
        trained (``resize=False``: as they come, e.g. ImageNet-C's files, already 224 px crops), no normalisation.
        """
        return self.data_config.image_transform(resize)

    def on_test_epoch_start(self) -> None:
        count = max(len(self.trainer.num_test_batches), 1)
        metrics = ClassificationMetrics(self.hparams.num_classes, self.hparams.ece_bins).to(self.device)
        self._test_metrics = PerDataloaderMetrics(metrics, count)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if not bool(torch.isfinite(logits).all()):
            rank_zero_warn("Non-finite test logits: batch left out of the test metrics.")
            return logits
        self._test_metrics[dataloader_idx].update(logits, y)
        return logits

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def on_test_epoch_end(self) -> None:
        self._test_metrics.log(self, "test", error=True)
