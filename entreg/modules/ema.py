"""The training loop shared by the generative modules: one network trained on a loss, its non-finite batches
skipped, an EMA copy updated after every finite batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from entreg.modules.skipping import SkipNonFiniteSteps

__all__ = ["EMATrainedNetwork", "OptimizerFactory"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class EMATrainedNetwork(SkipNonFiniteSteps):
    """Base of :class:`~entreg.modules.diffusion.DiffusionModule` and :class:`~entreg.modules.flow.FlowMatchingModule`:
    subclasses set ``self.ema`` (an ``AveragedModel``) and ``self.optimizer_factory``, return the trained
    network from :meth:`trained_network` and end ``training_step`` with :meth:`loss_step`."""

    optimizer_factory: OptimizerFactory | None
    ema: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._skipped_batch = False

    def trained_network(self) -> nn.Module:
        raise NotImplementedError

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        make_optimizer = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        return make_optimizer(self.trained_network().parameters())
