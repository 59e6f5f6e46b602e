"""ComputeBudget: stop a GRPO fine-tuning run at a compute budget and record its evaluations on the way."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L

__all__ = ["ComputeBudget"]


class ComputeBudget(L.Callback):
    """Stop the fit after the first training iteration at which the module's compute units
    (``module.cost["units"]``: forward 1, forward + backward 3, as
    :class:`~entreg.modules.grpo.GRPOModule` and :class:`~entreg.modules.grpo_pipeline.GRPOPipelineModule` count
    them) reach ``units``, so that GRPO variants compare at equal compute.

    With ``eval_every`` > 0 it also records the evaluation history in :attr:`history`: ``module.evaluate()`` when
    the fit starts, every ``eval_every`` iterations and at the stop, each entry with the ``iteration``, the cost
    counters and the ``seconds`` of fitting so far (the learning curve of ``scripts/bench_grpo.py``). The history
    is saved in checkpoints, so a resumed run continues it.

    The counters are this process's own work; under DDP the fit stops on every rank when one rank reaches the
    budget.

    Args:
        units: the budget in compute units (> 0).
        eval_every: evaluate every this many iterations (0: never; only stop).

    Example:
        >>> from entreg.modules.grpo import GRPOModule
        >>> from entreg.nn.denoisers import MLPDenoiser
        >>> module = GRPOModule(MLPDenoiser(dim=2, hidden=8), lambda x, c: -x.norm(dim=1), (2,), steps=4,
        ...                     group_size=4, prompts=2, eval_every=0, eval_samples=8)
        >>> budget = ComputeBudget(units=100, eval_every=1)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[budget], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module)
        >>> [entry["iteration"] for entry in budget.history], budget.history[-1]["units"] >= 100
        ([0, 1, 2], True)
    """

    def __init__(self, units: float, eval_every: int = 0) -> None:
        if isinstance(units, bool) or not isinstance(units, (int, float)) or not math.isfinite(units) or units <= 0:
            raise ValueError(f"units must be a finite number > 0, got {units!r}")
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
            raise ValueError(f"eval_every must be an integer >= 0 (0: no evaluations), got {eval_every!r}")
        self.units, self.eval_every = float(units), eval_every
        self.history: list[dict[str, Any]] = []
        self._started = time.perf_counter()
        self._seconds_before = 0.0  # fitting time of the run this one resumes

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "cost", None), dict) or not hasattr(pl_module, "iteration"):
            raise TypeError(
                f"ComputeBudget needs a module that counts its compute (cost['units'] and iteration, e.g. "
                f"GRPOModule); {type(pl_module).__name__} does not"
            )

    def _record(self, pl_module: Any) -> None:
        seconds = self._seconds_before + time.perf_counter() - self._started
        self.history.append(
            {"iteration": pl_module.iteration, **pl_module.cost, "seconds": seconds, **pl_module.evaluate()}
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        if self.eval_every and not any(entry["iteration"] == pl_module.iteration for entry in self.history):
            self._record(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        done = trainer.strategy.reduce_boolean_decision(pl_module.cost["units"] >= self.units, all=False)
        if self.eval_every and (done or pl_module.iteration % self.eval_every == 0):
            self._record(pl_module)
        if done:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "seconds": self._seconds_before + time.perf_counter() - self._started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._seconds_before = float(state_dict.get("seconds", 0.0))
