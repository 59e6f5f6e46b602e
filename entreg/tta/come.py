"""COME: conservatively minimising entropy (Zhang et al., ICLR 2025), as an entropy for any TTA method.

Reference: github.com/BlueWhaleLab/COME (``tent_come.py``). The logits are read as a subjective
opinion over C classes plus an "uncertain" mass: with S = sum_k exp(z_k), beliefs
b_k = exp(z_k) / (S + K) and uncertainty u = K / (S + K); the loss is the entropy of
(b_1 .. b_C, u) + 1e-7. The logit norm is detached, so only the direction of z gets a gradient.
K = 1000 is a literal of the reference code, whatever the number of classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["come_entropy"]


def come_entropy(logits: Tensor, k: float = 1000.0, eps: float = 1e-7) -> Tensor:
    """Per-sample opinion entropy of ``logits`` (N, C), computed in log space (no overflow).

    Example:
        >>> h = come_entropy(torch.zeros(2, 10))  # S = 10, u = 1000/1010: mostly "uncertain"
        >>> h.shape, bool(h[0] < 0.1)
        (torch.Size([2]), True)
    """
    norm = logits.norm(dim=1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)  # all-zero logits: no NaN
    z = logits / norm * norm.detach()  # the value of the logits, the gradient of their direction only
    log_total = torch.logaddexp(torch.logsumexp(z, dim=1, keepdim=True), torch.full_like(norm, math.log(k)))
    opinion = torch.cat([(z - log_total).exp(), (math.log(k) - log_total).exp()], dim=1) + eps
    return -(opinion * opinion.log()).sum(dim=1)
