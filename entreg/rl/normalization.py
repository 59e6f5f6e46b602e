"""Running mean and variance of a stream (Chan, Golub, LeVeque 1979 parallel merge), for observation and return
normalisation as in RL-Zoo's ``VecNormalize`` setting for MuJoCo."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RunningMeanStd"]


class RunningMeanStd(nn.Module):
    """Mean and (population) variance of everything passed to :meth:`update`.

    Starts from mean 0, variance 1 and a pseudo-count ``epsilon`` (as ``VecNormalize``), so the first update
    moves the statistics almost fully to the batch's; outputs divide by sqrt(var + ``eps``). Batches merge
    exactly: updating with ``a`` then ``b`` equals updating with their concatenation (up to rounding), so
    per-rank statistics can be merged. The statistics are float64 numpy arrays (updated at every env step, where
    tensor overhead would dominate), saved in the state dict as tensors.

    Args:
        shape: shape of one sample (``()`` for scalars).
        epsilon: initial pseudo-count.
        eps: added to the variance when normalising (``VecNormalize``: 1e-8).
        clip: :meth:`normalize` and :meth:`scale` clip their output to [-clip, clip] (None: no clip).

    Example:
        >>> rms = RunningMeanStd((2,), epsilon=1e-12)
        >>> rms.update(np.array([[1.0, 10.0], [3.0, 30.0]]))
        >>> rms.mean.round(6).tolist(), rms.var.round(6).tolist()
        ([2.0, 20.0], [1.0, 100.0])
        >>> rms.normalize(torch.tensor([[3.0, 0.0]]))
        tensor([[ 1., -2.]])
    """

    def __init__(
        self, shape: tuple[int, ...] = (), epsilon: float = 1e-4, eps: float = 1e-8, clip: float | None = 10.0
    ) -> None:
        super().__init__()
        if not (epsilon > 0 and eps > 0):
            raise ValueError(f"epsilon and eps must be > 0, got {epsilon}, {eps}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.epsilon, self.eps, self.clip = epsilon, eps, clip
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)
        self.count = float(epsilon)

    def update(self, batch: np.ndarray | Tensor) -> None:
        """Add the samples of ``batch`` (shape (B, *shape)); an empty batch changes nothing."""
        batch = _numpy(batch)
        if batch.shape[0]:
            self.merge(batch.mean(0), batch.var(0), batch.shape[0])

    def merge(self, mean: np.ndarray | Tensor, var: np.ndarray | Tensor, count: float) -> None:
        """Add the statistics (mean, population variance, count) of a set of samples."""
        count = float(count)
        if count <= 0:
            return
        mean, var = _numpy(mean), _numpy(var)
        total = self.count + count
        delta = mean - self.mean
        m2 = self.var * self.count + var * count + np.square(delta) * self.count * count / total
        self.mean = self.mean + delta * count / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """(x - mean) / sqrt(var + eps), clipped, in the type (and dtype, device) of ``x``."""
        return self._clip((x - self._like(self.mean, x)) / self._like(np.sqrt(self.var + self.eps), x))

    def scale(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """x / sqrt(var + eps), clipped (``VecNormalize``'s reward scaling by the std of the return)."""
        return self._clip(x / self._like(np.sqrt(self.var + self.eps), x))

    @staticmethod
    def _like(value: np.ndarray, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        return torch.as_tensor(value, dtype=x.dtype, device=x.device) if isinstance(x, Tensor) else value

    def _clip(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        return x if self.clip is None else x.clip(-self.clip, self.clip)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "mean": torch.tensor(np.asarray(self.mean)),
            "var": torch.tensor(np.asarray(self.var)),
            "count": self.count,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mean, self.var = state["mean"].double().numpy().copy(), state["var"].double().numpy().copy()
        self.count = float(state["count"])

    def extra_repr(self) -> str:
        return f"shape={self.mean.shape}, epsilon={self.epsilon}, eps={self.eps}, clip={self.clip}"


def _numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
