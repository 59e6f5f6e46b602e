"""EntropyController: keep the entropy of a model's outputs near a target by adjusting a coefficient."""

from __future__ import annotations

import difflib
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from entreg.callbacks.entropy_stats import EntropyStats
from entreg.callbacks.output_capture import OutputCapture, OutputKey
from entreg.distributions import CategoricalFormat, categorical_entropy_of
from entreg.loggers import log_metrics, logging_step

__all__ = ["EntropyController"]


def _finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class EntropyController(L.Callback):
    """Proportional-integral control of a coefficient so that the mean predictive entropy of the
    training batches follows ``target`` (EntroPIC, arXiv 2511.15248).

    Every ``every_n_steps`` optimizer steps, with H the mean entropy of the outputs seen since the
    last update (over all DDP ranks) and e = target - H (H - target if ``raises_entropy=False``)::

        integral += e
        coef = clip(initial + kp * e + ki * integral, min_value, max_value)

    and the module's attribute ``attribute`` is set to ``coef``. ``kp = 0`` is plain dual ascent on
    the constraint H >= target, the automatic temperature rule of SAC (Haarnoja et al. 2018).
    With ``anti_windup=True`` (default) the integral is clamped so that ``initial + ki * integral``
    stays within the bounds, so the coefficient reacts as soon as the error changes sign; for
    ``kp = 0`` this makes each update the projected step ``coef <- clip(coef + ki * e)``.
    ``anti_windup=False`` is the unclamped formula of the paper. ``initial`` (default: the
    attribute's value when the fit starts) is 0 in the paper's formula.

    The outputs are read as :class:`EntropyMonitor` reads them (a forward hook on ``module``).
    Logged every update: ``controller/{name}`` (the coefficient), ``controller/{name}_entropy``
    and ``controller/{name}_error``. The controller state is saved in checkpoints, and the
    coefficient is written back to the module when a fit (or a resumed fit) starts.

    Args:
        attribute: dotted path of a float (or 0-dim tensor) attribute of the LightningModule,
            e.g. ``"confidence_penalty.coef"`` or ``"output_activation.target_entropy"``.
        target: target mean entropy in nats.
        kp: proportional gain (>= 0).
        ki: integral gain (>= 0); ``kp`` and ``ki`` cannot both be 0.
        min_value: lower bound of the coefficient.
        max_value: upper bound of the coefficient (``math.inf`` for none).
        initial: coefficient offset; ``None`` reads the attribute when the fit starts.
        raises_entropy: whether a larger coefficient raises the entropy (confidence penalty, ERA
            target, temperature); ``False`` for an entropy-minimisation weight.
        anti_windup: clamp the integral to the bounds (see above).
        every_n_steps: update period in optimizer steps.
        module: submodule whose output holds the logits (``None``: the module's forward).
        output_key: key/index/attribute of a dict, tuple or object output.
        input_format: ``"logits"`` or ``"probs"``.
        class_dim: dimension of the classes.
        name: metric name (default: ``attribute``).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import DemoModel
        >>> from lightning.pytorch.demos.boring_classes import RandomDataset
        >>> controller = EntropyController("learning_rate", target=2.0, kp=0.0, ki=1e-3)
        >>> trainer = L.Trainer(max_steps=3, callbacks=[controller], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> model = DemoModel(out_dim=10)
        >>> trainer.fit(model, torch.utils.data.DataLoader(RandomDataset(32, 16), batch_size=4))
        >>> controller.updates, model.learning_rate == controller.coef
        (3, True)
    """

    def __init__(
        self,
        attribute: str,
        target: float,
        kp: float = 0.0,
        ki: float = 0.01,
        min_value: float = 0.0,
        max_value: float = math.inf,
        initial: float | None = None,
        raises_entropy: bool = True,
        anti_windup: bool = True,
        every_n_steps: int = 1,
        module: str | None = None,
        output_key: OutputKey = None,
        input_format: CategoricalFormat = "logits",
        class_dim: int = -1,
        name: str | None = None,
    ) -> None:
        if not isinstance(attribute, str) or not attribute or attribute.startswith(".") or attribute.endswith("."):
            raise ValueError(
                f"attribute must be a dotted attribute path like 'confidence_penalty.coef', got {attribute!r}"
            )
        self.target = _finite("target", target)
        self.kp, self.ki = _finite("kp", kp), _finite("ki", ki)
        if self.kp < 0 or self.ki < 0 or self.kp == self.ki == 0:
            raise ValueError(f"kp and ki must be >= 0 and not both 0, got kp={kp}, ki={ki}")
        self.min_value = _finite("min_value", min_value)
        if not max_value > self.min_value:
            raise ValueError(f"max_value must be > min_value={min_value} (math.inf for no bound), got {max_value}")
        self.max_value = float(max_value)
        if initial is not None and not self.min_value <= _finite("initial", initial) <= self.max_value:
            raise ValueError(
                f"initial must be within [min_value, max_value] = [{min_value}, {max_value}], got {initial}"
            )
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if input_format not in ("logits", "probs"):
            raise ValueError(f"input_format must be 'logits' or 'probs', got {input_format!r}")
        self.attribute, self.raises_entropy, self.anti_windup = attribute, raises_entropy, anti_windup
        self.every_n_steps, self.input_format, self.class_dim = every_n_steps, input_format, class_dim
        self.name = name or attribute
        self.module = module
        self.initial = None if initial is None else float(initial)
        self.integral = 0.0
        self.coef = math.nan if initial is None else self.initial
        self.updates = 0
        self._last_update_step = 0
        self._window: EntropyStats | None = None
        self._loaded_window: dict[str, Tensor] | None = None
        self._capture = OutputCapture(module, output_key, self._on_output)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute, module=self.module)

    # --- the attribute ---------------------------------------------------------------------

    def _owner(self, pl_module: L.LightningModule) -> tuple[Any, str]:
        path, _, leaf = self.attribute.rpartition(".")
        owner: Any = pl_module
        for part in path.split(".") if path else []:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, leaf):
            names = [n for n, _ in pl_module.named_modules() if n] + list(vars(pl_module))
            close = difflib.get_close_matches(path or leaf, names, n=5, cutoff=0.5)
            raise AttributeError(
                f"EntropyController: {type(pl_module).__name__} has no attribute {self.attribute!r}"
                + (f"; close names: {close}" if close else "")
            )
        return owner, leaf

    def _read(self, pl_module: L.LightningModule) -> float:
        owner, leaf = self._owner(pl_module)
        value = getattr(owner, leaf)
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value.item())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"EntropyController: {self.attribute!r} must be a float or a 1-element tensor, got {value!r}")

    def _write(self, pl_module: L.LightningModule, value: float) -> None:
        owner, leaf = self._owner(pl_module)
        current = getattr(owner, leaf)
        if isinstance(current, Tensor):
            with torch.no_grad():
                current.fill_(value)
        else:
            setattr(owner, leaf, value)

    def _check_bounds(self, pl_module: L.LightningModule, current: float) -> None:
        """Set the finite bounds once (and restore): an attribute that validates its value
        (ERA's target, the penalty's coef) refuses bad bounds now rather than mid-training."""
        try:
            for bound in (self.min_value, self.max_value):
                if math.isfinite(bound):
                    self._write(pl_module, bound)
        except ValueError as err:
            raise ValueError(
                f"EntropyController bounds [{self.min_value}, {self.max_value}] are not valid values of "
                f"{self.attribute!r}: {err}"
            ) from err
        finally:
            self._write(pl_module, current)

    # --- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._capture.bind(pl_module)
        current = self._read(pl_module)
        self._check_bounds(pl_module, current)
        self._window = EntropyStats(trainer.strategy.root_device)  # new tensors in every process
        if self._loaded_window is not None:
            self._window.load_state_dict(self._loaded_window)
            self._loaded_window = None
        if self.initial is None:
            if not self.min_value <= current <= self.max_value:
                raise ValueError(
                    f"EntropyController: {self.attribute}={current} is outside [{self.min_value}, {self.max_value}]"
                )
            self.initial = self.coef = current

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(pl_module, self.coef)  # a resumed fit continues with the controller's coefficient

    def _on_output(self, output: Tensor) -> None:
        self._window.update(categorical_entropy_of(output, self.input_format, self.class_dim))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._capture.attach()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._capture.detach()
        if trainer.global_step - self._last_update_step < self.every_n_steps:
            return
        self._last_update_step = trainer.global_step
        entropy, count = self._window.reduced_mean(trainer.strategy)
        self._window.reset()
        if count == 0:  # nothing finite measured (e.g. a skipped NaN batch): no update
            return
        error = self.update(entropy.item())
        self._write(pl_module, self.coef)
        metrics = {
            f"controller/{self.name}": self.coef,
            f"controller/{self.name}_entropy": entropy.item(),
            f"controller/{self.name}_error": error,
        }
        log_metrics(trainer, metrics, logging_step(trainer))

    def update(self, entropy: float) -> float:
        """One controller step for a measured mean entropy; sets :attr:`coef` and returns the error."""
        error = self.target - entropy if self.raises_entropy else entropy - self.target
        self.integral += error
        if self.anti_windup and self.ki > 0:
            low, high = (self.min_value - self.initial) / self.ki, (self.max_value - self.initial) / self.ki
            self.integral = min(max(self.integral, low), high)
        raw = self.initial + self.kp * error + self.ki * self.integral
        self.coef = min(max(raw, self.min_value), self.max_value)
        self.updates += 1
        return error

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "integral": self.integral,
            "coef": self.coef,
            "updates": self.updates,
            "last_update_step": self._last_update_step,
            "window": self._window.state_dict() if self._window is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial, self.integral, self.coef = state_dict["initial"], state_dict["integral"], state_dict["coef"]
        self.updates, self._last_update_step = state_dict["updates"], state_dict["last_update_step"]
        if state_dict["window"] is not None:
            if self._window is not None:
                self._window.load_state_dict(state_dict["window"])
            else:
                self._loaded_window = state_dict["window"]
