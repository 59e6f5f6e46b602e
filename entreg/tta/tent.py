"""Tent: fully test-time adaptation by entropy minimization (Wang et al., ICLR 2021).

Reference: github.com/DequanWang/tent (``tent.py``). One step per batch on the mean entropy of the
batch, adapting only ``BatchNorm2d`` affine parameters with batch statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entreg.tta.base import StepInfo, TTAMethod

__all__ = ["Tent"]


class Tent(TTAMethod):
    """Minimise the mean prediction entropy of each test batch.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        ...                           torch.nn.LazyLinear(10))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> tent = Tent(net, num_classes=10, lr=1e-3)
        >>> logits, info = tent.adapt(torch.randn(16, 3, 8, 8))
        >>> logits.shape, info.selected
        (torch.Size([16, 10]), 16)
    """

    name = "tent"

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        logits = self.logits(x)
        loss, count = self.backward_mean(self.entropy(logits))
        self.step_optimizer()
        return logits, StepInfo(count, len(x), loss, mask=torch.ones(len(x), dtype=torch.bool, device=x.device))
