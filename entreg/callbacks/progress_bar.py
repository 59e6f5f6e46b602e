"""ProgressBar: Lightning's rich progress bar, counting what a run is measured in."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["ProgressBar"]


class ProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`, whose training description reads
    ``env steps 3,000/6,000`` for a module with a ``training_progress`` attribute ``(done, total, unit)`` (the RL
    agents: a run ends at a number of env steps, not epochs), and ``Epoch 5`` for a run without ``max_epochs``
    (instead of Lightning's ``Epoch 5/-2``).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> ProgressBar.describe(BoringModel(), current_epoch=5, max_epochs=-1)
        'Epoch 5'
        >>> agent = BoringModel()
        >>> agent.training_progress = (3000, 6000, "env steps")
        >>> ProgressBar.describe(agent, current_epoch=5, max_epochs=-1)
        'env steps 3,000/6,000'
    """

    @staticmethod
    def describe(module: L.LightningModule | None, current_epoch: int, max_epochs: int | None) -> str:
        """The training description for ``module`` at ``current_epoch``."""
        progress = getattr(module, "training_progress", None)
        if progress is not None:
            done, total, unit = progress
            return f"{unit} {done:,}/{total:,}" if total else f"{unit} {done:,}"
        if max_epochs is None or max_epochs < 0:
            return f"Epoch {current_epoch}"
        return f"Epoch {current_epoch}/{max_epochs - 1}"

    def _get_train_description(self, current_epoch: int) -> str:
        description = self.describe(self.trainer.lightning_module, current_epoch, self.trainer.max_epochs)
        return f"{description:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self.progress is not None and self.train_progress_bar_id is not None:
            if getattr(pl_module, "training_progress", None) is not None:
                description = self._get_train_description(trainer.current_epoch)
                if self.theme.description:
                    description = f"[{self.theme.description}]{description}"
                self.progress.update(self.train_progress_bar_id, description=description)
