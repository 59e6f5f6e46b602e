"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023).

Reference: github.com/mr-eggplant/SAR (``sar.py``, ``sam.py``). Reliable samples (H < E0) are
kept; the entropy is minimised with a SAM step (perturb the parameters by rho g/||g||, take the
gradient of the entropy there, restore, step); a moving average of the second loss below 0.2
restores the source model. BN/LN/GN affine parameters are adapted, the top of the network frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from entreg.tta.base import StepInfo, TTAMethod, resolve_margin
from entreg.tta.norm import ALL_NORMS, SAR_EXCLUDE, SAR_EXCLUDE_NAMES

__all__ = ["SAR", "sam_perturbation"]


@torch.no_grad()
def sam_perturbation(params: list[nn.Parameter], rho: float) -> list[Tensor]:
    """SAM's ascent step e = rho g / (||g|| + 1e-12), with ||g|| the 2-norm of all gradients
    together; returns e per parameter (zeros where there is no gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [torch.zeros_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    return [torch.zeros_like(p) if p.grad is None else p.grad * scale for p in params]


class SAR(TTAMethod):
    """Sharpness-aware, reliable entropy minimisation with model recovery.

    Args:
        model, num_classes, optimizer, lr, recovery_threshold: see :class:`TTAMethod` (recovery is
            always on: it is part of SAR; the reference hard-codes the threshold 0.2).
        margin: entropy threshold E0, default 0.4 ln C.
        rho: SAM neighbourhood radius (0.05).
        reference_recovery: recover as the reference code does (default): restore the weights but
            keep the optimizer's momentum and the low moving average (so the next batches reset
            again until it rises above the threshold). ``False``: a clean reset of weights,
            optimizer state and moving average, as the paper describes it.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
        ...                           torch.nn.LazyLinear(10))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> sar = SAR(net, num_classes=10, margin=2.3)
        >>> _, info = sar.adapt(torch.randn(16, 3, 8, 8))
        >>> info.total
        16
    """

    name = "sar"
    norm_types = ALL_NORMS
    exclude = SAR_EXCLUDE
    exclude_names = SAR_EXCLUDE_NAMES
    threshold_args = ("margin",)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        margin: float | None = None,
        rho: float = 0.05,
        reference_recovery: bool = True,
        **kwargs,
    ) -> None:
        kwargs.setdefault("recovery", True)
        super().__init__(model, num_classes, **kwargs)
        self.margin = resolve_margin("margin", margin, num_classes)
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.rho, self.reference_recovery = float(rho), reference_recovery

    def _recover(self) -> None:
        if not self.reference_recovery:
            self.reset()
            return
        # the reference's SAR.reset() reloads the weights; SAM's load_state_dict leaves the base SGD's
        # momentum in place, and SAR.forward then writes the low moving average back
        self.model.load_state_dict(self._source[0], strict=True)
        self.resets += 1

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        logits = self.logits(x)
        h = self.entropy(logits)
        reliable = torch.nonzero(h < self.margin).flatten()
        self.backward_mean(h[reliable])  # an empty selection: NaN loss and zero gradients, as in the reference
        perturbation = sam_perturbation(self.params, self.rho)
        theta = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_add_(self.params, perturbation)
        self.optimizer.zero_grad()
        h2 = self.entropy(self.logits(x))[reliable]
        kept = torch.nonzero(h2 < self.margin).flatten()
        loss, count = self.backward_mean(h2[kept])
        with torch.no_grad():
            torch._foreach_copy_(self.params, theta)  # back to theta; step with the gradient at theta + e
        self.step_optimizer()  # also with nothing selected: the momentum moves the weights, as in the reference
        return logits, StepInfo(count, len(x), loss, mask=self.selection_mask(len(x), reliable[kept]))
