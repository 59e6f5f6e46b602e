"""Skipping training batches whose loss is not finite, the same way on every DDP rank."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor


class SkipNonFiniteSteps(L.LightningModule):
    """A LightningModule base whose ``training_step`` can skip a batch with a non-finite loss.

    Call :meth:`all_finite` on the loss; when it is False return :meth:`skip_batch` (warns, counts
    ``skipped_steps``, logs ``train/skipped_steps`` and returns an exact zero connected to every trainable
    parameter, because under DDP every rank must run backward), otherwise call :meth:`count_good_batch`.
    An optimizer step after only skipped batches updates nothing (gradients are dropped), so weights and
    optimizer state stay untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped_steps = 0
        self._good_batches = 0  # finite batches since the last optimizer step

    def all_finite(self, value: Tensor) -> bool:
        """Whether ``value`` is finite on every rank (all ranks must agree to skip a step together)."""
        bad = (~torch.isfinite(value)).any().float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        return not bool(bad)

    def skip_batch(self, batch_idx: int) -> Tensor:
        """Record a skipped batch; returns the zero loss to hand back to Lightning."""
        self.skipped_steps += 1
        rank_zero_warn(
            f"Non-finite training loss at step {self.global_step} (batch {batch_idx}): batch skipped, "
            f"weights not updated ({self.skipped_steps} skipped so far)."
        )
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def count_good_batch(self) -> None:
        self._good_batches += 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._good_batches == 0:  # every batch since the last step was skipped: no update at all
            for group in optimizer.param_groups:  # optimizers leave parameters without .grad untouched
                for param in group["params"]:
                    param.grad = None
        self._good_batches = 0
