"""DeYO: destroy your object, entropy minimisation filtered by pseudo-label probability difference
(Lee et al., ICLR 2024).

Reference: github.com/Jhyun17/DeYO (``methods/deyo.py``). Samples with H < 0.5 ln C are kept;
their images are destroyed by shuffling 4x4 patches; PLPD = p(y|x) - p(y|x') for the predicted
class y measures how much the prediction relied on the object's shape. Samples with
PLPD > threshold are weighted by exp(E0 - H) + exp(PLPD) in the entropy loss. No step when no
sample is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entreg.tta.base import StepInfo, TTAMethod, resolve_margin
from entreg.tta.norm import ALL_NORMS, SAR_EXCLUDE, SAR_EXCLUDE_NAMES

__all__ = ["DeYO", "plpd", "shuffle_patches"]


def shuffle_patches(images: Tensor, patches_per_side: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Cut each image into ``patches_per_side`` x ``patches_per_side`` patches and permute them,
    per image, with ``torch.rand`` on the CPU from ``generator`` (default the global generator, as the
    reference does). Images whose
    side is not a multiple are resized to the nearest smaller multiple and back (bilinear, antialiased).

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y = shuffle_patches(x, 2)
        >>> sorted(y.flatten().tolist()) == x.flatten().tolist()
        True
    """
    b, c, height, width = images.shape
    if min(height, width) < patches_per_side:
        n = patches_per_side
        raise ValueError(f"shuffle_patches needs images of at least {n}x{n} pixels, got {height}x{width}")
    side = (width // patches_per_side) * patches_per_side  # the reference resizes to a square from the width
    x = images
    if (height, width) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    n, p = patches_per_side, side // patches_per_side
    patches = x.reshape(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, p, p)
    order = torch.argsort(torch.rand(b, n * n, generator=generator), dim=-1).to(images.device)
    patches = patches[torch.arange(b, device=images.device).unsqueeze(-1), order]
    x = patches.reshape(b, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, side, side)
    if (height, width) != (side, side):
        x = F.interpolate(x, size=(width, width), mode="bilinear", antialias=True, align_corners=False)
    return x


def plpd(logits: Tensor, destroyed_logits: Tensor) -> Tensor:
    """Pseudo-label probability difference p(y|x) - p(y|x'), y = argmax p(.|x)."""
    probs, destroyed = logits.softmax(1), destroyed_logits.softmax(1)
    label = probs.argmax(1, keepdim=True)
    return (probs.gather(1, label) - destroyed.gather(1, label)).reshape(-1)


class DeYO(TTAMethod):
    """Entropy minimisation on samples whose prediction depends on the object's shape.

    Args:
        model, num_classes, optimizer, lr, recovery, recovery_threshold: see :class:`TTAMethod`.
        margin: entropy filter tau_Ent, default 0.5 ln C.
        margin_e0: E0 of the sample weight exp(E0 - H), default 0.4 ln C.
        plpd_threshold: tau_PLPD (0.2 in the reference's defaults, 0.3 for mild shifts).
        patches_per_side: patch grid of the shuffle (4: 16 patches).
        reweight_ent, reweight_plpd: weights of the two terms of the sample weight (1 and 1).
        seed_each_batch: ``None`` (default): the patch permutations come from the global generator,
            as in the reference, which seeds it once (``torch.manual_seed(args.seed)``, default 2024,
            at the start of ``main.py``) and then draws every batch's permutations from it, so they
            depend on everything drawn before. An int ``s``: each batch's permutations come from a
            generator seeded with ``s`` (the numbers ``torch.manual_seed(s)`` before every batch would
            give, without touching the global generator): a batch is destroyed the same way whatever
            ran before it, e.g. in a resumed or reordered stream.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4),
        ...                           torch.nn.Flatten(), torch.nn.LazyLinear(10))
        >>> _ = net(torch.randn(2, 3, 8, 8))
        >>> deyo = DeYO(net, num_classes=10, margin=2.3)
        >>> _, info = deyo.adapt(torch.randn(16, 3, 8, 8))
        >>> info.total
        16
    """

    name = "deyo"
    norm_types = ALL_NORMS
    exclude = SAR_EXCLUDE
    exclude_names = SAR_EXCLUDE_NAMES
    threshold_args = ("margin", "plpd_threshold")

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        margin: float | None = None,
        margin_e0: float | None = None,
        plpd_threshold: float = 0.2,
        patches_per_side: int = 4,
        reweight_ent: float = 1.0,
        reweight_plpd: float = 1.0,
        seed_each_batch: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model, num_classes, **kwargs)
        self.margin = resolve_margin("margin", margin, num_classes, 0.5)
        self.margin_e0 = resolve_margin("margin_e0", margin_e0, num_classes)
        if not -1 <= plpd_threshold < 1:
            raise ValueError(f"plpd_threshold is a probability difference in [-1, 1), got {plpd_threshold}")
        if not isinstance(patches_per_side, int) or patches_per_side < 2:
            raise ValueError(f"patches_per_side must be an int >= 2, got {patches_per_side!r}")
        self.plpd_threshold, self.patches_per_side = float(plpd_threshold), patches_per_side
        self.reweight_ent, self.reweight_plpd = float(reweight_ent), float(reweight_plpd)
        if seed_each_batch is not None and (isinstance(seed_each_batch, bool) or not isinstance(seed_each_batch, int)):
            raise TypeError(f"seed_each_batch must be an int seed or None, got {seed_each_batch!r}")
        self.seed_each_batch = seed_each_batch

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo]:
        logits = self.logits(x)
        h = self.entropy(logits)
        confident = torch.nonzero(h < self.margin).flatten()
        h = h[confident]
        difference = h.detach()[:0]  # empty unless some sample is confident
        if len(confident):  # the reference draws no random numbers for a batch without one
            generator = None if self.seed_each_batch is None else torch.Generator().manual_seed(self.seed_each_batch)
            with torch.no_grad():
                destroyed = self.logits(shuffle_patches(x[confident].detach(), self.patches_per_side, generator))
            difference = plpd(logits[confident], destroyed).detach()
        shape_based = torch.nonzero(difference > self.plpd_threshold).flatten()
        h, difference = h[shape_based], difference[shape_based]
        if self.reweight_ent or self.reweight_plpd:  # alpha = exp(E0 - H) + exp(PLPD)
            alpha = self.reweight_ent * torch.exp(self.margin_e0 - h.detach())
            h = h * (alpha + self.reweight_plpd * torch.exp(difference))
        loss, count = self.backward_mean(h)
        if count:  # no step when no sample passes both filters
            self.optimizer.step()
        self.optimizer.zero_grad()
        mask = self.selection_mask(len(x), confident[shape_based])
        return logits, StepInfo(count, len(x), loss if count else None, mask=mask)
