"""BN-adapt: prediction with the statistics of the test batch, no update (Schneider et al., NeurIPS 2020;
Nado et al. 2020; "BN-1" in mariodoebler/test-time-adaptation's tables).

Reference: mariodoebler/test-time-adaptation (``methods/norm.py``, ``BNTest``): the model in eval mode with its
BatchNorm layers normalising each batch with its own statistics, nothing trained. Also here: :class:`NoUpdate`,
the base of the benchmark rows that only predict (BN-adapt and :class:`~entreg.tta.source.Source`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from entreg.nn.select import OutputKey
from entreg.tta.base import StepInfo, TTAMethod, _Configuration
from entreg.tta.norm import BATCHNORM_ONLY, force_batch_statistics

__all__ = ["BNAdapt", "NoUpdate"]


class NoUpdate(TTAMethod, register=False):
    """A method that predicts and never updates: its BatchNorm layers of ``batch_statistics`` normalise with the
    statistics of each batch (none: the model as trained). :meth:`reset` has nothing to undo; :meth:`restore` gives
    the BatchNorm layers their running statistics back. ``StepInfo.selected`` is 0 (no loss) and no warning says so.
    """

    updates: ClassVar[bool] = False
    batch_statistics: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, model: nn.Module, num_classes: int, output_key: OutputKey = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.model, self.num_classes, self.output_key = model, num_classes, output_key
        self.params: list[nn.Parameter] = []
        self.recovery, self.ema, self.resets, self.strategy = False, None, 0, None
        self.entropy_kind, self.lr_scaling, self.lr_factor = "shannon", None, None
        self._configuration = _Configuration.capture(model, self.batch_statistics)
        force_batch_statistics(model, self.batch_statistics)

    def adapt(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        """The logits of ``x`` (no gradient, no update)."""
        self._check_configured("adapt")
        with torch.no_grad():
            logits = self.logits(x)
        return logits, StepInfo(0, len(x), None, mask=torch.zeros(len(x), dtype=torch.bool, device=logits.device))

    def reset(self) -> None:
        """Nothing to restore: the weights never change (counted in :attr:`resets` as for any method)."""
        self._check_configured("reset")
        self.resets += 1

    def restore(self, keep_adapted: bool = False) -> None:
        """Give the BatchNorm layers their running statistics back (``keep_adapted`` changes nothing)."""
        if not self.restored:
            self._configuration.restore()
            self._configuration = None


class BNAdapt(NoUpdate):
    """BatchNorm2d layers on the statistics of the test batch, nothing trained (a model without BatchNorm2d
    predicts as its source model).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        ...                           torch.nn.LazyLinear(10)).eval()
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> bn = BNAdapt(net, num_classes=10)
        >>> logits, info = bn.adapt(torch.randn(16, 3, 8, 8))
        >>> logits.shape, info.selected, net[1].running_mean is None
        (torch.Size([16, 10]), 0, True)
        >>> bn.restore()
        >>> net[1].running_mean is None
        False
    """

    name = "bn_adapt"
    batch_statistics = BATCHNORM_ONLY
