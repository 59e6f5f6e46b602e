"""A rectified-flow model whose velocity is exact: an isotropic Gaussian mixture with learnable weights.

Per component k, x_t = (1 - t) x0 + t eps ~ N((1 - t) mu_k, var_t I) with var_t = (1 - t)^2 s^2 + t^2, and
E[eps - x0 | x_t, k] = (t - (1 - t) s^2) / var_t (x_t - (1 - t) mu_k) - mu_k; the velocity is its average
under the posterior over components. Sampling it transports N(0, I) to the mixture exactly (up to the
solver's error), so a policy that only learns the weights is a tiny real flow model for GRPO tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def ring_means(modes: int = 8, radius: float = 4.0) -> Tensor:
    angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


class MixtureVelocity(nn.Module):
    """``v(x, t)`` of a Gaussian mixture (``means`` (K, D), common ``std``) with weights softmax(logits)
    (learnable); ``t`` in [0, 1] unless ``time_scale`` says the caller scales it."""

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None, time_scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("means", means.double())
        self.std, self.time_scale = std, time_scale
        w = torch.full((len(means),), 1.0 / len(means), dtype=torch.float64) if weights is None else weights.double()
        self.logits = nn.Parameter(w.log())

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        t = (t.double() / self.time_scale)[:, None]
        var = (1 - t) ** 2 * self.std**2 + t**2
        centred = x.double()[:, None, :] - (1 - t[:, :, None]) * self.means
        log_w = torch.log_softmax(self.logits, 0) - (centred**2).sum(-1) / (2 * var)
        r = torch.softmax(log_w, dim=1)
        per_component = (t - (1 - t) * self.std**2)[:, :, None] / var[:, :, None] * centred - self.means
        return (r[:, :, None] * per_component).sum(1).to(x.dtype)
