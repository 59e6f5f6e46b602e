"""OSTTA: open-set test-time adaptation by the "wisdom of crowds" (Lee, Das, Choo, Choi; ICCV 2023).

No official repository; this follows the implementation in github.com/gaozhengqing/UniEnt
(``cifar/ostta.py``). A frozen copy of the configured source model votes: a sample is kept when the
adapted model is at least as confident in the frozen model's predicted class as the frozen model
is (confidence that fell marks a sample the adaptation is hurting, e.g. an unknown class). The loss
is the mean entropy of the kept samples minus alpha times the entropy of the batch's mean
prediction (over all samples), which keeps predictions diverse. The step is taken even when no
sample is kept, as in the reference.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from entreg.tta.base import StepInfo, TTAMethod

__all__ = ["OSTTA"]


class OSTTA(TTAMethod):
    """Entropy minimisation on the samples the frozen source model vouches for.

    Args:
        model, num_classes, optimizer, lr, entropy, recovery, recovery_threshold: see :class:`TTAMethod`.
        alpha: weight of the batch-diversity term (0.5 in the reference; its grid: 1, 0.5, 0.2, 0.1).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        ...                           torch.nn.LazyLinear(10))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> _, info = OSTTA(net, num_classes=10).adapt(torch.randn(16, 3, 8, 8))
        >>> info.selected  # the first batch: adapted == frozen, every sample is kept
        16
    """

    name = "ostta"

    def __init__(self, model: nn.Module, num_classes: int, alpha: float = 0.5, **kwargs) -> None:
        super().__init__(model, num_classes, **kwargs)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.frozen = copy.deepcopy(model).requires_grad_(False)  # after configuration: batch statistics too

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        with torch.no_grad():
            frozen_conf, frozen_label = self.logits(x, self.frozen).softmax(1).max(1)
        logits = self.logits(x)
        probs = logits.softmax(1)
        keep = torch.nonzero(probs.gather(1, frozen_label[:, None]).squeeze(1) >= frozen_conf).flatten()
        # the batch's mean prediction over all ranks; each rank's graph holds its own share of it
        local = probs.sum(0)
        total = self.all_sum(torch.cat([local.detach(), probs.new_tensor([len(x)])]))
        mean = (local + (total[:-1] - local.detach())) / total[-1]
        diversity = self.alpha * (mean * mean.log()).sum()  # -alpha * H(mean prediction)
        loss, count = self.backward_mean(self.entropy(logits)[keep], extra=diversity * self.world_size)
        self.step_optimizer()  # also when nothing is kept, as in the reference
        value = loss - float(diversity.detach()) * (self.world_size - 1) if count else None
        return logits, StepInfo(count, len(x), value, mask=self.selection_mask(len(x), keep))
