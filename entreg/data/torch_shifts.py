"""Distribution shifts in torch: ImageNet-C's families at five severities as simple stand-ins for the benchmark's
corruptions (pixel values in [0, 1]), computed on the fly with no extra package. Used by
:class:`~entreg.data.shifts.ShiftedDigitsDataModule` and by the ``"torch"`` backend of
:class:`~entreg.data.digits_c.DigitsCCache`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SEVERITY", "SHIFTS", "apply_shift"]

SEVERITY = {  # ImageNet-C's parameters for the five severities
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),  # sigma in pixels of a 32x32 image
}
SHIFTS = tuple(SEVERITY)


def apply_shift(images: Tensor, shift: str, severity: int, generator: torch.Generator) -> Tensor:
    """``images`` (N, C, H, W) in [0, 1] under ``shift`` at ``severity`` 1-5, clipped to [0, 1].

    Example:
        >>> x = torch.full((2, 1, 8, 8), 0.5)
        >>> y = apply_shift(x, "contrast", 5, torch.Generator().manual_seed(0))
        >>> torch.allclose(y, x)  # a constant image keeps its mean under a contrast change
        True
    """
    if shift not in SEVERITY:
        raise ValueError(f"unknown shift {shift!r}; valid: {list(SHIFTS)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity}")
    c = SEVERITY[shift][severity - 1]
    if shift == "gaussian_noise":
        out = images + c * torch.randn(images.shape, generator=generator)
    elif shift == "impulse_noise":
        u = torch.rand(images.shape, generator=generator)
        out = torch.where(u < c / 2, 0.0, torch.where(u > 1 - c / 2, 1.0, images))
    elif shift == "contrast":
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        out = (images - mean) * c + mean
    elif shift == "brightness":
        out = images + c
    else:
        from torchvision.transforms.functional import gaussian_blur

        radius = int(3 * c + 0.5)
        out = gaussian_blur(images, kernel_size=2 * radius + 1, sigma=c)
    return out.clamp(0.0, 1.0)
