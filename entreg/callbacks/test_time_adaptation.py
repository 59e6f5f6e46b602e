"""TestTimeAdaptation: adapt any LightningModule on its test or predict stream."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from entreg.callbacks.output_capture import OutputKey, find_submodule, select_output
from entreg.entropy import categorical_entropy
from entreg.loggers import log_metrics
from entreg.tta import METHODS, StepInfo, TTAMethod, build_method, check_method_kwargs

__all__ = ["TestTimeAdaptation"]

ResetMode = Literal["continual", "episodic", "per_dataloader"]
RESET_MODES = ("continual", "episodic", "per_dataloader")


class TestTimeAdaptation(L.Callback):
    """Adapt the model on each test/predict batch before the module's own ``test_step`` /
    ``predict_step`` sees it, with any method of :mod:`entreg.tta` (Tent, EATA, ETA, SAR, DeYO, OSTTA).

    The callback turns the loop's inference mode off (gradients are needed), builds the method
    on the LightningModule (or its submodule ``module``) when the loop starts (at the first batch
    when ``num_classes`` has to be read off the logits), and on every batch runs one adaptation step
    on the inputs. The module's step then predicts with the adapted model;
    the logits from before the update (what the papers report as online error) are in
    :attr:`last_logits`. Logged per batch to the loggers: ``tta/entropy`` (mean entropy before the
    update), ``tta/selected`` (fraction of the batch in the loss), ``tta/resets`` and, when the batch
    holds labels, ``tta/online_error``.

    The adaptation step runs in the trainer's precision context: ``Trainer(precision="bf16-mixed")`` (or
    ``entreg-adapt trainer.precision=bf16-mixed``) autocasts its forward passes, while entreg's entropies and the
    logged logits are in float32; ``16-mixed`` has no gradient scaler here, so prefer bf16. ``channels_last=True``
    converts the model and the batches (``+method.channels_last=true`` from the command line).

    A batch with NaN/Inf inputs is skipped with a warning (the model is untouched). Batch size 1
    with BatchNorm layers gets a warning: the statistics of one sample are unreliable (use a
    GroupNorm/LayerNorm model, as SAR recommends).

    When the test/predict run ends (also with an exception), the model is given back as it came
    (:meth:`TTAMethod.restore <entreg.tta.TTAMethod.restore>`): BatchNorm running buffers and
    ``track_running_stats``, every parameter's ``requires_grad``, the train/eval flags, and the source
    weights unless ``keep_adapted=True``. Other callbacks' ``on_test_end``/``on_predict_end`` still see
    the adapted model; the state dict afterwards has the keys it had before, so ``load_state_dict``
    and a later ``fit`` work as without the callback.

    Args:
        method: name in :data:`entreg.tta.METHODS`.
        num_classes: number of classes; default ``pl_module.hparams.num_classes``, else the width of
            the logits of the first batch (one extra forward pass, in eval mode, without gradients).
        module: dotted name of the submodule that maps inputs to logits (default: the module itself;
            SAR's/DeYO's name-based exclusions are read inside wrappers either way, see
            :func:`entreg.tta.norm.network_root`).
        output_key: where the logits are when that module's forward returns a dict, tuple or output
            object (an index, a key or an attribute such as ``"logits"``; ``None``: the output itself).
        input_key: index/key of the inputs in a batch (a plain tensor batch is the input).
        target_key: index/key of the labels, for the online error (``None``: none).
        reset: ``continual`` (never), ``episodic`` (before every batch) or ``per_dataloader`` (when
            the dataloader changes: one dataloader per distribution shift).
        source_batches: for methods that use clean source data (EATA's Fisher information): pass
            this many batches of the datamodule's clean validation data to the method's ``prepare``
            when the loop starts (0: none; EATA then has no Fisher penalty).
        keep_adapted: keep the adapted weights when the run ends (default: back to the source
            weights). BatchNorm layers get their source running statistics back either way (adaptation
            normalised each batch with its own statistics and never updated them), so a BatchNorm model
            in eval mode then uses source statistics with adapted affine parameters; a LayerNorm/GroupNorm
            model predicts as after the last update.
        channels_last: put the model and each batch in ``channels_last`` memory format (faster convolutions
            on recent GPUs; same results up to float rounding).
        **method_kwargs: arguments of the method (``lr``, ``e_margin``, ``norm_types``, ``optimizer``...).

    Example:
        >>> TestTimeAdaptation("tent", num_classes=10, lr=1e-3)
        TestTimeAdaptation(method='tent', reset='continual', num_classes=10, kwargs={'lr': 0.001})
        >>> TestTimeAdaptation("eata", e_margn=0.9)
        Traceback (most recent call last):
        ...
        TypeError: EATA got an unexpected argument 'e_margn'; valid: [...]
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        method: str = "tent",
        num_classes: int | None = None,
        module: str | None = None,
        output_key: OutputKey = None,
        input_key: OutputKey = 0,
        target_key: OutputKey = 1,
        reset: ResetMode = "continual",
        source_batches: int = 0,
        keep_adapted: bool = False,
        channels_last: bool = False,
        **method_kwargs: Any,
    ) -> None:
        check_method_kwargs(method, method_kwargs)  # unknown names fail now, not when the test loop starts
        if reset not in RESET_MODES:
            raise ValueError(f"reset must be one of {RESET_MODES}, got {reset!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or None (read off the logits), got {num_classes!r}")
        if not isinstance(source_batches, int) or source_batches < 0:
            raise ValueError(f"source_batches must be an int >= 0, got {source_batches!r}")
        if source_batches and not METHODS[method].uses_source_data:
            users = sorted(name for name, cls in METHODS.items() if cls.uses_source_data)
            raise ValueError(f"source_batches: {method!r} uses no source data (methods that do: {users})")
        for name, flag in (("keep_adapted", keep_adapted), ("channels_last", channels_last)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.method_name, self.num_classes, self.module = method, num_classes, module
        self.input_key, self.target_key, self.reset = input_key, target_key, reset
        self.source_batches, self.keep_adapted, self.channels_last = source_batches, keep_adapted, channels_last
        self.method_kwargs = method_kwargs | ({"output_key": output_key} if output_key is not None else {})
        self.method: TTAMethod | None = None
        self.last_logits: Tensor | None = None
        self.last_info: StepInfo | None = None
        self.batches = 0
        self.online: dict[int, list[int]] = {}  # dataloader -> [wrong, seen] of the pre-update predictions
        self._dataloader_idx: int | None = None
        self._warned_single = False
        self._has_batchnorm = False
        self._stage = "test"
        self._modes: list[tuple[nn.Module, bool]] = []  # train/eval flags before the run, put back at its end

    def __repr__(self) -> str:
        return (
            f"TestTimeAdaptation(method={self.method_name!r}, reset={self.reset!r}, num_classes={self.num_classes}"
            + (", keep_adapted=True" if self.keep_adapted else "")
            + f", kwargs={self.method_kwargs})"
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.test_loop.inference_mode = False  # adaptation needs autograd in the test/predict loops
        trainer.predict_loop.inference_mode = False
        self._modes = [(m, m.training) for m in pl_module.modules()]  # before the loop calls eval()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        """Give the model back as it came (the method's :meth:`restore`) with the train/eval flags of
        before the run; once per run."""
        if self.method is None or self.method.restored:
            return
        self.method.restore(keep_adapted=self.keep_adapted)
        for module, training in self._modes:
            module.training = training

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.method, self._stage = None, stage
        self.batches, self.online, self._dataloader_idx = 0, {}, None
        model = find_submodule(pl_module, self.module)
        self._has_batchnorm = any(isinstance(m, _BatchNorm) for m in model.modules())
        num_classes = self.num_classes or getattr(pl_module.hparams, "num_classes", None)
        if num_classes is not None:
            self._build(trainer, model, int(num_classes))

    def _build(self, trainer: L.Trainer, model: nn.Module, num_classes: int) -> None:
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.method = build_method(self.method_name, model, num_classes, **self.method_kwargs)
        if trainer.world_size > 1:
            self._start_distributed(trainer, self._stage)
        if self.source_batches:  # every rank reads the same clean batches: identical results
            self.method.prepare(self._source_data(trainer))

    def _classes_from_logits(self, model: nn.Module, x: Tensor) -> int:
        """The number of classes read off the model's logits on ``x`` (eval mode, no gradients)."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = select_output(model(x), self.method_kwargs.get("output_key"), "TestTimeAdaptation (output_key)")
        model.train(was_training)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"TestTimeAdaptation: expected logits of shape (N, C >= 2), got {tuple(logits.shape)}; "
                "pass num_classes or output_key"
            )
        return int(logits.shape[1])

    def _start_distributed(self, trainer: L.Trainer, stage: str) -> None:
        """Lightning does not wrap the model in DDP outside fit: the method sums its gradients and
        counts over ranks itself. Every batch holds collectives, so all ranks must see as many."""
        self.method.strategy = trainer.strategy
        counts = trainer.num_test_batches if stage == "test" else trainer.num_predict_batches
        local = torch.tensor([float(sum(counts))], device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(local).reshape(-1)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(
                f"TestTimeAdaptation under DDP needs the same number of {stage} batches on every rank, got "
                f"{gathered.tolist()}: use Lightning's distributed sampler (use_distributed_sampler=True pads them)"
            )
        if self._has_batchnorm:
            rank_zero_warn(
                "TestTimeAdaptation under DDP with BatchNorm: each rank normalises with its own batch, so the "
                "result differs from one process on the global batch (GroupNorm/LayerNorm models are exact)"
            )

    def _source_data(self, trainer: L.Trainer) -> list[Tensor]:
        """The inputs of the first ``source_batches`` batches of the datamodule's clean validation data."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ValueError("source_batches needs a datamodule with a val_dataloader of clean samples")
        device = trainer.strategy.root_device
        batches = []
        for batch in datamodule.val_dataloader():
            if len(batches) == self.source_batches:
                break
            batches.append(self._select(batch, self.input_key).to(device))
        return batches

    def _select(self, batch: Any, key: OutputKey) -> Tensor | None:
        if isinstance(batch, Tensor):
            return batch if key == self.input_key else None
        try:
            return select_output(batch, key, "the batch")
        except (KeyError, TypeError):
            return None

    def _adapt(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, dataloader_idx: int) -> None:
        x = self._select(batch, self.input_key)
        if x is None:
            raise KeyError(f"TestTimeAdaptation: no input at input_key={self.input_key!r} in the batch")
        if self.method is None:
            model = find_submodule(pl_module, self.module)
            self._build(trainer, model, self._classes_from_logits(model, x))
        method = self.method
        if self.reset == "episodic" or (self.reset == "per_dataloader" and dataloader_idx != self._dataloader_idx):
            if self.batches:
                method.reset()
        self._dataloader_idx = dataloader_idx
        self.batches += 1
        bad = method.all_sum((~torch.isfinite(x)).any().float().reshape(1))  # skip on every rank together
        if bad.item():
            rank_zero_warn(f"TestTimeAdaptation: batch {self.batches - 1} has NaN/Inf inputs: skipped, model untouched")
            self.last_logits, self.last_info = None, None
            return
        if len(x) == 1 and self._has_batchnorm and not self._warned_single:
            self._warned_single = True
            rank_zero_warn(
                "TestTimeAdaptation with batch size 1 on a BatchNorm model: BatchNorm then normalises with the "
                "statistics of one image, which are unreliable; use larger batches or a GroupNorm/LayerNorm model"
            )
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with trainer.precision_plugin.forward_context():  # trainer.precision=bf16-mixed / 16-mixed: autocast
            logits, info = method.adapt(x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # the entropy, error and callers' metrics in float32
            logits = logits.float()
        self.last_logits, self.last_info = logits, info
        target = None if self.target_key is None else self._select(batch, self.target_key)
        labelled = target is not None and target.shape == logits.shape[:1]
        wrong = (logits.argmax(1) != target).sum() if labelled else logits.new_zeros(())
        local = [categorical_entropy(logits, dim=1).sum(), len(x), wrong, len(x) if labelled else 0]
        local = torch.stack([torch.as_tensor(v, dtype=logits.dtype, device=logits.device) for v in local])
        entropy_sum, seen, wrong, labels = method.all_sum(local).tolist()  # over all ranks
        metrics = {
            "tta/entropy": entropy_sum / seen,
            "tta/selected": info.selected / seen,
            "tta/resets": float(method.resets),
        }
        if labels:
            metrics["tta/online_error"] = wrong / labels
            counts = self.online.setdefault(dataloader_idx, [0, 0])
            counts[0], counts[1] = counts[0] + int(wrong), counts[1] + int(labels)
        log_metrics(trainer, metrics, step=self.batches - 1)

    def online_error(self) -> dict[int, float]:
        """Error of the pre-update predictions per dataloader (the papers' online error)."""
        return {idx: wrong / seen for idx, (wrong, seen) in self.online.items() if seen}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "predict")

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._adapt(trainer, pl_module, batch, dataloader_idx)

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._adapt(trainer, pl_module, batch, dataloader_idx)
