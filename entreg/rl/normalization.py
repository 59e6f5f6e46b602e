"""Running mean and variance of a stream (Chan, Golub, LeVeque 1979 parallel merge), for observation and return
normalisation as in RL-Zoo's ``VecNormalize`` setting for MuJoCo."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RunningMeanStd"]


class RunningMeanStd(nn.Module):
    """Mean and (population) variance of everything passed to :meth:`update`, kept in float64 buffers so they are
    saved in the state dict.

    Starts from mean 0, variance 1 and a pseudo-count ``epsilon`` (as ``VecNormalize``), so the first update
    moves the statistics almost fully to the batch's; outputs divide by sqrt(var + ``eps``). Batches merge
    exactly: updating with ``a`` then ``b`` equals updating with their concatenation (up to rounding), so
    per-rank statistics can be merged.

    Args:
        shape: shape of one sample (``()`` for scalars).
        epsilon: initial pseudo-count.
        eps: added to the variance when normalising (``VecNormalize``: 1e-8).
        clip: :meth:`normalize` clips its output to [-clip, clip] (None: no clip).

    Example:
        >>> rms = RunningMeanStd((2,), epsilon=1e-12)
        >>> rms.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> [round(v, 6) for v in rms.mean.tolist()], [round(v, 6) for v in rms.var.tolist()]
        ([2.0, 20.0], [1.0, 100.0])
    """

    mean: Tensor
    var: Tensor
    count: Tensor

    def __init__(
        self, shape: tuple[int, ...] = (), epsilon: float = 1e-4, eps: float = 1e-8, clip: float | None = 10.0
    ) -> None:
        super().__init__()
        if not (epsilon > 0 and eps > 0):
            raise ValueError(f"epsilon and eps must be > 0, got {epsilon}, {eps}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.epsilon, self.eps = epsilon, eps
        self.clip = clip
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(epsilon, dtype=torch.float64))

    def update(self, batch: Tensor) -> None:
        """Add the samples of ``batch`` (shape (B, *shape)); an empty batch changes nothing."""
        if batch.shape[0] == 0:
            return
        batch = batch.to(torch.float64)
        self.merge(batch.mean(0), batch.var(0, unbiased=False), float(batch.shape[0]))

    def merge(self, mean: Tensor, var: Tensor, count: float | Tensor) -> None:
        """Add the statistics (mean, population variance, count) of a set of samples."""
        count = torch.as_tensor(count, dtype=torch.float64, device=self.count.device)
        if not count > 0:
            return
        mean, var = mean.to(self.mean), var.to(self.var)
        total = self.count + count
        delta = mean - self.mean
        m2 = self.var * self.count + var * count + delta.square() * self.count * count / total
        self.mean.add_(delta * count / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: Tensor) -> Tensor:
        """(x - mean) / sqrt(var + eps), clipped, in the dtype of ``x``."""
        out = (x - self.mean.to(x)) / torch.sqrt(self.var + self.eps).to(x)
        return out if self.clip is None else out.clamp(-self.clip, self.clip)

    def scale(self, x: Tensor) -> Tensor:
        """x / sqrt(var + eps), clipped (``VecNormalize``'s reward scaling by the std of the return)."""
        out = x / torch.sqrt(self.var + self.eps).to(x)
        return out if self.clip is None else out.clamp(-self.clip, self.clip)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mean.shape)}, epsilon={self.epsilon}, eps={self.eps}, clip={self.clip}"
