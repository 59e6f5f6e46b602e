"""What every test-time adaptation method shares: configuring the model, one update per batch that
returns the logits from before the update, and an exact reset to the source model."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from entreg.entropy import categorical_entropy
from entreg.nn.optim import OptimizerFactory, optimizer_or_default
from entreg.nn.select import OutputKey, select_output
from entreg.tta.come import come_entropy
from entreg.tta.lr_scaling import lr_factor
from entreg.tta.norm import (
    BATCHNORM_ONLY,
    BatchNormState,
    collect_norm_params,
    describe_norm_layers,
    force_batch_statistics,
    resolve_norm_types,
)

if TYPE_CHECKING:  # the methods themselves need no Lightning
    from lightning.pytorch.strategies import Strategy

__all__ = [
    "ENTROPIES",
    "METHODS",
    "NO_SELECTION_PATIENCE",
    "OptimizerFactory",
    "StepInfo",
    "TTAMethod",
    "entropy_margin",
    "resolve_margin",
]

ENTROPIES = ("shannon", "come")
METHODS: dict[str, type[TTAMethod]] = {}  # name -> class; every subclass with a ``name`` registers itself
NO_SELECTION_PATIENCE = 5  # warn when a method selects no sample in this many consecutive batches


def entropy_margin(num_classes: int, fraction: float = 0.4) -> float:
    """The references' entropy threshold ``fraction * ln C`` (E0 = 0.4 ln C: 2.763 for ImageNet)."""
    return fraction * math.log(num_classes)


def resolve_margin(name: str, value: float | None, num_classes: int, fraction: float = 0.4) -> float:
    """A method's entropy threshold: ``value``, or ``fraction * ln C`` when it is None; must be > 0."""
    margin = entropy_margin(num_classes, fraction) if value is None else float(value)
    if not margin > 0:
        raise ValueError(f"{name} must be > 0 nats (default {fraction} ln C), got {value}")
    return margin


@dataclass
class StepInfo:
    """What one adaptation step did: samples in the loss (over all DDP ranks), samples in this
    rank's batch, the loss value (None: no step), whether the model was reset, and ``mask``: which
    of this rank's samples entered the loss (bool, one per sample; e.g. to see how many samples of
    unknown classes an open-set filter let through)."""

    selected: int
    total: int
    loss: float | None = None
    reset: bool = False
    mask: Tensor | None = None


@dataclass
class _Configuration:
    """What configuring a model for adaptation changes, recorded before the change: every
    parameter's ``requires_grad``, every module's train/eval flag and the BatchNorm layers' state."""

    requires_grad: list[tuple[nn.Parameter, bool]]
    training: list[tuple[nn.Module, bool]]
    batchnorms: list[BatchNormState]

    @classmethod
    def capture(cls, model: nn.Module, types: Sequence[type[nn.Module]]) -> _Configuration:
        return cls(
            [(p, p.requires_grad) for p in model.parameters()],
            [(m, m.training) for m in model.modules()],
            BatchNormState.capture(model, types),
        )

    def restore(self) -> None:
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, flag in self.training:
            module.training = flag
        for state in self.batchnorms:
            state.restore()


class TTAMethod:
    """Base class of the test-time adaptation methods in :mod:`entreg.tta`.

    On construction the model is configured as the reference implementations do: every
    ``BatchNorm2d`` (and every BatchNorm of ``norm_types``) uses the statistics of the current batch
    (its running buffers are dropped, so this holds under ``eval()`` too), and only the affine
    parameters of the normalisation layers of ``norm_types`` (minus the excluded names) are trained.
    The model keeps its train/eval mode (the references call ``model.train()``, which also turns on
    dropout; identical without dropout).

    :meth:`adapt` runs one update on a batch and returns the logits computed *before* the update,
    as every reference does. :meth:`reset` restores the source parameters and the optimizer state
    exactly. :meth:`restore` undoes the configuration when adaptation is over (BatchNorm running
    buffers, ``requires_grad`` flags, train/eval flags; source or adapted weights), so the model can be
    saved, loaded and trained as before. A method that selects no sample in ``NO_SELECTION_PATIENCE``
    (5) consecutive batches warns, naming the thresholds to loosen (``threshold_args``). With
    ``recovery=True`` any method resets itself when the moving average of its loss falls below
    ``recovery_threshold`` (SAR's model-recovery rule). Methods that use clean source
    data (EATA's Fisher information) take it once, before adapting, through :meth:`prepare`.

    A subclass that sets its own ``name`` registers itself in :data:`METHODS` under it (``class
    X(TTAMethod, register=False)`` opts out).

    Args:
        model: the classifier; it is modified in place.
        num_classes: number of classes (thresholds scale with ln C).
        optimizer: factory ``params -> Optimizer``; default SGD(lr, momentum=0.9).
        lr: learning rate of the default optimizer.
        entropy: ``"shannon"``, or ``"come"`` for COME's opinion entropy (ICLR 2025) in place of the
            Shannon entropy everywhere the method uses it (selection, weights, loss).
        recovery: reset when the loss EMA drops below ``recovery_threshold``.
        recovery_threshold: SAR's constant 0.2.
        norm_types: normalisation layers whose affine parameters are adapted, as classes or names
            (``"batchnorm1d"``, ``"batchnorm2d"``, ``"layernorm"``, ``"groupnorm"``...); default the
            method's (Tent/EATA/OSTTA: BatchNorm2d as their references; SAR/DeYO: BatchNorm2d,
            LayerNorm, GroupNorm). E.g. ``norm_types=["batchnorm1d", "layernorm"]`` for an MLP.
        exclude: skip norm layers whose module name *contains* one of these strings (default the
            method's: SAR/DeYO skip ``layer4``, ``blocks.9``-``blocks.11`` and ``norm.``). Names are
            relative to the network inside wrappers (:func:`~entreg.tta.norm.network_root`: a
            LightningModule's ``backbone`` or ``net``), as if the reference got the bare network.
        exclude_names: skip norm layers whose module name *equals* one of these (SAR/DeYO: ``norm``,
            a timm ViT's final norm; ``stages.0.norm`` is not excluded, as in the references); relative
            names as ``exclude``, or full names from ``model``.
        output_key: where the logits are when the model's forward returns a dict, tuple or output
            object (an index, a key or an attribute name; ``None``: the output is the logits).
        lr_scaling: ``None`` (the lr as given), ``"linear"`` or ``"sar"``: ``lr`` (and the learning rates of
            ``optimizer``) are those of batch size ``reference_batch_size``, rescaled by
            :func:`~entreg.tta.lr_scaling.lr_factor` for the size of the first batch (over all DDP ranks), e.g.
            ``lr=2.5e-4, lr_scaling="sar"`` is SAR's ResNet-50 lr at any batch size. Kept through :meth:`reset`.
        reference_batch_size: the batch size ``lr`` was tuned at (64: ImageNet-C in the references).
    """

    name: ClassVar[str] = "base"
    norm_types: tuple[type[nn.Module], ...] = BATCHNORM_ONLY
    exclude: Sequence[str] = ()
    exclude_names: Sequence[str] = ()
    uses_source_data: ClassVar[bool] = False  # True: :meth:`prepare` takes clean source batches
    updates: ClassVar[bool] = True  # False: a row that only predicts (source, BN-adapt): no loss, nothing selected
    threshold_args: ClassVar[tuple[str, ...]] = ()  # the arguments that set the sample selection, for warnings

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register and "name" in vars(cls):
            if cls.name in METHODS and METHODS[cls.name] is not cls:
                raise TypeError(f"two test-time adaptation methods named {cls.name!r}: {METHODS[cls.name]} and {cls}")
            METHODS[cls.name] = cls

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        lr: float = 2.5e-4,
        entropy: str = "shannon",
        recovery: bool = False,
        recovery_threshold: float = 0.2,
        norm_types: Sequence[type[nn.Module] | str] | None = None,
        exclude: Sequence[str] | None = None,
        exclude_names: Sequence[str] | None = None,
        output_key: OutputKey = None,
        lr_scaling: str | None = None,
        reference_batch_size: int = 64,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        lr_factor(lr_scaling, 1, reference_batch_size)  # checks both now, not at the first batch
        self.lr_scaling, self.reference_batch_size = lr_scaling, reference_batch_size
        self.lr_factor: float | None = None  # set at the first batch when lr_scaling is on
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if entropy not in ENTROPIES:
            raise ValueError(f"entropy must be one of {ENTROPIES}, got {entropy!r}")
        if not recovery_threshold >= 0:
            raise ValueError(f"recovery_threshold must be >= 0, got {recovery_threshold}")
        self.model, self.num_classes, self.output_key = model, num_classes, output_key
        self.recovery, self.recovery_threshold, self.entropy_kind = recovery, recovery_threshold, entropy
        if norm_types is not None:
            self.norm_types = resolve_norm_types(norm_types)
        if exclude is not None:
            self.exclude = tuple(exclude)
        if exclude_names is not None:
            self.exclude_names = tuple(exclude_names)
        batchnorm_types = (*BATCHNORM_ONLY, *self.norm_types)
        self._configuration: _Configuration | None = _Configuration.capture(model, batchnorm_types)
        force_batch_statistics(model, batchnorm_types)
        self.params = collect_norm_params(model, self.norm_types, self.exclude, self.exclude_names)
        if not self.params:
            self._configuration.restore()  # leave the model as it came
            names = ", ".join(t.__name__ for t in self.norm_types)
            raise ValueError(
                f"{type(self).__name__} adapts the affine parameters of {names} layers; none found (excluding names "
                f"containing {list(self.exclude)} or equal to {list(self.exclude_names)}). The model has: "
                f"{describe_norm_layers(model)}; choose them with norm_types=[...] (e.g. 'batchnorm1d', 'layernorm')"
            )
        self.optimizer = optimizer_or_default(optimizer, torch.optim.SGD, lr=lr, momentum=0.9)(self.params)
        self.ema: float | None = None
        self.resets = 0
        self.strategy: Strategy | None = None  # set under DDP by the callback
        self._empty_batches = 0  # consecutive batches without a selected sample
        self._source = self._snapshot()

    def logits(self, x: Tensor, model: nn.Module | None = None) -> Tensor:
        """The logits of ``model`` (default the adapted model) on ``x``, taken from its output with ``output_key``."""
        output = (self.model if model is None else model)(x)
        return select_output(output, self.output_key, f"{type(self).__name__} (output_key)")

    def prepare(self, batches: Iterable[Tensor]) -> None:
        """Take what the method needs from clean source batches, once before adapting (EATA: the
        Fisher information). Methods with ``uses_source_data = False`` need nothing."""
        raise TypeError(f"{type(self).__name__} uses no source data")

    def _snapshot(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Restore the source model and a fresh optimizer state, exactly."""
        self._check_configured("reset")
        model_state, optimizer_state = self._source
        self.model.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        if self.lr_factor is not None:  # the snapshot holds the unscaled learning rates
            self._scale_lr(self.lr_factor)
        self.ema = None
        self.resets += 1

    def _scale_lr(self, factor: float) -> None:
        """Set every param group's lr to its source value times ``factor``."""
        for group, state in zip(self.optimizer.param_groups, self._source[1]["param_groups"], strict=True):
            group["lr"] = state["lr"] * factor
        self.lr_factor = factor

    @property
    def restored(self) -> bool:
        """Whether :meth:`restore` has undone the configuration (the method cannot adapt any more)."""
        return self._configuration is None

    def _check_configured(self, action: str) -> None:
        if self.restored:
            raise RuntimeError(
                f"{type(self).__name__}.{action}: restore() has undone the configuration; build a new method to adapt"
            )

    def restore(self, keep_adapted: bool = False) -> None:
        """Undo what configuring the model changed, once adaptation is over: the BatchNorm layers get
        back ``track_running_stats`` and their running buffers with the source values (adaptation
        normalised every batch with its own statistics and never updated them), every parameter its
        ``requires_grad``, every module its train/eval flag of construction time. The weights go
        back to the source weights, or stay adapted with ``keep_adapted=True``: then a BatchNorm
        model in eval mode normalises with the source running statistics and the adapted affine
        parameters (LayerNorm/GroupNorm models predict exactly as after the last update). The state
        dict then has the keys it had before, so checkpoints load and a later fit trains every
        parameter. Calling it again does nothing; the method cannot adapt after it.

        Example:
            >>> from entreg.tta import Tent
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            >>> keys = list(net.state_dict())
            >>> tent = Tent(net, num_classes=4)
            >>> "1.running_mean" in net.state_dict(), net[0].weight.requires_grad
            (False, False)
            >>> tent.restore()
            >>> list(net.state_dict()) == keys, net[0].weight.requires_grad
            (True, True)
        """
        if self.restored:
            return
        if not keep_adapted:  # the snapshot has the configured model's keys: load it before the buffers return
            self.model.load_state_dict(self._source[0], strict=True)
        self._configuration.restore()
        self._configuration = None
        self.optimizer.zero_grad(set_to_none=True)

    def entropy(self, logits: Tensor) -> Tensor:
        """Per-sample entropy of the predictions (N, C): Shannon, or COME's opinion entropy."""
        return come_entropy(logits) if self.entropy_kind == "come" else categorical_entropy(logits, dim=1)

    # --- one process or several ------------------------------------------------------------
    # Under DDP (``strategy`` set by the callback) every loss is a mean over the samples of all
    # ranks: each rank back-propagates its own sum divided by the global count and the gradients
    # are summed across ranks, so the update equals one process on the global batch.

    @property
    def world_size(self) -> int:
        return 1 if self.strategy is None else self.strategy.world_size

    def all_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over ranks (itself in one process)."""
        if self.world_size == 1:
            return value
        return self.strategy.reduce(value.detach().clone(), reduce_op="sum")

    def _sync_grads(self) -> None:
        if self.world_size == 1:
            return
        for p in self.params:  # every rank reduces every tensor, in the same order
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.strategy.reduce(p.grad, reduce_op="sum")

    def backward_mean(self, values: Tensor, extra: Tensor | None = None) -> tuple[float, int]:
        """Back-propagate the mean of ``values`` over all ranks (plus ``extra``, a term every rank
        computes identically, e.g. a penalty on the parameters); returns (loss, global count). With
        no value anywhere the gradients are zero and the loss NaN, as the mean of an empty set."""
        count = int(self.all_sum(values.new_tensor(float(values.numel()))).item())
        loss = values.sum() / count if count else values.sum() * 0.0
        if extra is not None:
            loss = loss + extra / self.world_size
        loss.backward()
        self._sync_grads()
        value = float(self.all_sum(loss.detach())) if count else math.nan
        return value, count

    def step_optimizer(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _track(self, loss: float | None) -> bool:
        """SAR's moving average of the loss (NaN skipped) and its reset; whether a reset happened."""
        if loss is not None and not math.isnan(loss):
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if self.ema is not None and self.ema < self.recovery_threshold:
            self._recover()
            return True
        return False

    def _recover(self) -> None:
        """What a collapse triggers: a full reset (SAR's reference differs, see :class:`SAR`)."""
        self.reset()

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        """One update on batch ``x``; returns (logits before the update, what was done). Subclasses implement it."""
        raise NotImplementedError

    @staticmethod
    def selection_mask(n: int, index: Tensor) -> Tensor:
        """Boolean mask of length ``n`` that is True at ``index``."""
        return torch.zeros(n, dtype=torch.bool, device=index.device).index_fill_(0, index, True)

    def adapt(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        """Adapt on ``x`` (with gradients on, whatever the caller's mode); returns the detached
        pre-update logits and the :class:`StepInfo`."""
        self._check_configured("adapt")
        if self.lr_scaling is not None and self.lr_factor is None:
            batch = int(self.all_sum(torch.tensor(float(len(x)), device=x.device)).item())
            self._scale_lr(lr_factor(self.lr_scaling, batch, self.reference_batch_size))
        with torch.enable_grad():
            logits, info = self.step(x)
        if self.recovery:
            info.reset = self._track(info.loss)
        self._watch_selection(info.selected)
        return logits.detach(), info

    def _watch_selection(self, selected: int) -> None:
        """Warn once per streak of ``NO_SELECTION_PATIENCE`` batches without a selected sample (on
        rank 0 only under DDP: ``selected`` is the count over all ranks)."""
        self._empty_batches = 0 if selected else self._empty_batches + 1
        if self._empty_batches != NO_SELECTION_PATIENCE or getattr(self.strategy, "global_rank", 0) != 0:
            return
        if self.threshold_args:
            values = ", ".join(f"{arg}={getattr(self, arg):.4g}" for arg in self.threshold_args)
            advice = f"loosen the selection thresholds ({values})"
        else:
            advice = "its selection has no threshold to loosen; check the model and the data"
        warnings.warn(
            f"{type(self).__name__} selected no sample in {NO_SELECTION_PATIENCE} consecutive batches: its loss is "
            f"empty, so it learns nothing from this stream (num_classes={self.num_classes}); {advice}",
            UserWarning,
            stacklevel=3,
        )
