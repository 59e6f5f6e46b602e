"""Samples as one image, for ``samples.png`` and TensorBoard: a grid of image samples, or the 2-D histogram of
vector samples. Used by :func:`entreg.modules.ema.log_samples` (validation and GRPO evaluation samples) and by
``entreg-sample``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_grid"]


def sample_grid(samples: Tensor, nrow: int = 8, bins: int = 64) -> Tensor:
    """A (3, H, W) float32 image in [0, 1] on the CPU of ``samples``:

    - images (N, C, H, W) with values in [0, 1]: a grid of ``nrow`` images per row (torchvision's ``make_grid``);
    - vectors (N, D): the 2-D histogram of their first two coordinates (the second is 0 for D = 1), ``bins`` x
      ``bins`` over the finite points' range padded by 10% on each side, x to the right and y up, brightness
      sqrt(count / max count) so that sparse regions stay visible (black when no point is finite).

    Example:
        >>> sample_grid(torch.rand(10, 1, 8, 8), nrow=5).shape  # 2 rows of 5, 2-pixel borders
        torch.Size([3, 22, 52])
        >>> image = sample_grid(torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [float("nan"), 0.0]]), bins=4)
        >>> image[0]  # one point bottom left, two top right, the non-finite one left out
        tensor([[0.0000, 0.0000, 0.0000, 1.0000],
                [0.0000, 0.0000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000],
                [0.7071, 0.0000, 0.0000, 0.0000]])
    """
    samples = samples.detach().float().cpu()
    if samples.ndim == 4:
        from torchvision.utils import make_grid

        return make_grid(samples, nrow=nrow)
    if samples.ndim != 2:
        raise ValueError(f"samples must be images (N, C, H, W) or vectors (N, D), got shape {tuple(samples.shape)}")
    points = samples[torch.isfinite(samples).all(1)][:, :2]
    points = torch.cat([points, points.new_zeros(len(points), 2 - points.shape[1])], 1)
    if not len(points):
        return torch.zeros(3, bins, bins)
    low, high = points.amin(0), points.amax(0)
    pad = 0.1 * (high - low).clamp(min=1e-3)
    ranges = torch.stack([low - pad, high + pad], 1).flatten().tolist()  # (x_min, x_max, y_min, y_max)
    counts = torch.histogramdd(points, bins=bins, range=ranges).hist.T.flip(0)  # rows: y from the top down
    return (counts / counts.max()).sqrt().expand(3, -1, -1).contiguous()
