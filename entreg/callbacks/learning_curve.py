"""The learning curve of an RL agent (SACModule, PPOModule): every periodic evaluation with the policy's noise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from entreg.rl.envs import POLICY_TAGS

__all__ = ["LearningCurve"]


class LearningCurve(L.Callback):
    """Collects an RL agent's evaluations into a learning curve, the data of ``scripts/bench_rl.py``'s tables.

    After every training step it reads the module's ``last_evaluation`` (an :class:`entreg.rl.envs.Evaluation`, set
    at each multiple of the module's ``eval_every`` env steps and at the end of ``total_steps``) and, when it is new,
    appends a point: env ``step``, evaluation ``seed``, ``mean`` return, every episode's ``returns``, and the latest
    logged ``policy/std``, ``policy/entropy`` and ``policy/gaussian_entropy`` (how much noise the policy had then;
    a tag the agent has not logged yet is left out).
    The points are in :attr:`points`, survive checkpoints (``state_dict``), and with ``path`` are written there as
    JSON after every new point (rank 0).

    :meth:`final` is the last point's mean return, :meth:`auc` the mean of all points' means (the area under the curve
    over equally spaced evaluations: it rewards learning early).

    Example:
        >>> from entreg.modules.ppo import PPOModule
        >>> module = PPOModule("InvertedPendulum-v5", n_steps=64, batch_size=64, n_epochs=1, total_steps=128,
        ...                    eval_every=64, eval_episodes=1)
        >>> curve = LearningCurve()
        >>> trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, callbacks=[curve])
        >>> trainer.fit(module)
        >>> [point["step"] for point in curve.points], sorted(curve.points[0])
        ([64, 128], ['mean', 'policy/entropy', 'policy/gaussian_entropy', 'policy/std', 'returns', 'seed', 'step'])
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.points: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "last_evaluation"):
            raise TypeError(
                f"LearningCurve records an RL agent's evaluations (a module with `last_evaluation`, e.g. SACModule, "
                f"PPOModule); {type(pl_module).__name__} has none"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        record = pl_module.last_evaluation
        if record is None or (self.points and self.points[-1]["step"] >= record.step):
            return
        point = record.as_dict()
        metrics = trainer.callback_metrics
        point |= {tag: float(metrics[tag]) for tag in POLICY_TAGS if tag in metrics}  # strict JSON: no NaN
        self.points.append(point)
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.points, indent=1))

    def curve(self) -> list[list[float]]:
        """``[[step, mean return], ...]``."""
        return [[point["step"], point["mean"]] for point in self.points]

    def final(self) -> float:
        """The last evaluation's mean return."""
        return self.points[-1]["mean"]

    def auc(self) -> float:
        """The mean over the evaluations of their mean return."""
        return math.fsum(point["mean"] for point in self.points) / len(self.points)

    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(point) for point in self.points]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(point) for point in state_dict["points"]]
