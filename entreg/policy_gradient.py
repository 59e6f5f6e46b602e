"""The clipped policy-gradient loss of PPO (Schulman et al., arXiv 1707.06347) and GRPO, as plain tensor functions.

* :func:`clipped_surrogate_loss`: -mean(min(rho A, clip(rho, 1 - c, 1 + c) A)), rho = pi / pi_old, with the
  fraction of clipped ratios and an estimate of KL(pi_old || pi) (:func:`kl_estimate`);
* :func:`value_loss`: the critic's squared error, optionally clipped around the old values;
* :func:`masked_mean`: means over the entries that may train (a mask for invalid steps).

The KL estimators are Schulman's ("Approximating KL divergence", 2020), for samples drawn from pi_old and
log rho = log pi - log pi_old: ``k1 = -log rho`` (unbiased, can be negative), ``k2 = (log rho)^2 / 2`` (biased,
low variance) and ``k3 = (rho - 1) - log rho`` (unbiased and >= 0; Stable-Baselines3's ``approx_kl``).

Example:
    >>> ratio = torch.tensor([1.5, 0.5])
    >>> out = clipped_surrogate_loss(ratio.log(), torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=0.2)
    >>> round(float(out.loss), 4), float(out.clip_fraction)
    (-0.85, 1.0)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["KLEstimator", "PolicyLoss", "clipped_surrogate_loss", "kl_estimate", "masked_mean", "value_loss"]

KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is True (0 when there are none); all entries without a mask.

    Example:
        >>> masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False]))
        tensor(1.5000)
    """
    if mask is None:
        return x.mean()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def kl_estimate(log_ratio: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-sample estimates of KL(pi_old || pi) from ``log_ratio`` = log pi - log pi_old of samples of pi_old
    (see the module doc for k1, k2 and k3).

    Example:
        >>> log_ratio = torch.tensor([0.5]).log()
        >>> [round(float(kl_estimate(log_ratio, k)), 4) for k in ("k1", "k2", "k3")]
        [0.6931, 0.2402, 0.1931]
    """
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return (torch.exp(log_ratio) - 1.0) - log_ratio
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


class PolicyLoss(NamedTuple):
    """The clipped surrogate loss and its diagnostics (no gradient): the estimate of KL(pi_old || pi) and the
    fraction of samples whose ratio was clipped."""

    loss: Tensor
    approx_kl: Tensor
    clip_fraction: Tensor


def clipped_surrogate_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    mask: Tensor | None = None,
    *,
    kl_estimator: KLEstimator = "k3",
) -> PolicyLoss:
    """PPO's clipped objective, as a loss to minimise: -mean(min(rho A, clip(rho, 1 - c, 1 + c) A)),
    rho = exp(log_prob - old_log_prob), over the entries of ``mask`` (all without one).

    Args:
        log_prob, old_log_prob, advantages: per sample, one shape.
        clip_range: c > 0 (PPO: 0.2; Flow-GRPO and E-GRPO: 1e-4, their log-probabilities being means over
            dimensions).
        mask: the samples that train (None: all).
        kl_estimator: the ``approx_kl`` diagnostic (:func:`kl_estimate`; PPO: ``"k3"``, our GRPO: ``"k1"``).

    Returns:
        :class:`PolicyLoss`; ``clip_fraction`` is the share of samples with ``|rho - 1| > c``, in the ratio's
        dtype (at least float32).
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        approx_kl = masked_mean(kl_estimate(log_ratio, kl_estimator), mask)
        dtype = torch.promote_types(ratio.dtype, torch.float32)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).to(dtype), mask)
    return PolicyLoss(loss, approx_kl, clip_fraction)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float | None = None, mask: Tensor | None = None
) -> Tensor:
    """Mean squared error to the returns (SB3's value loss). With ``clip_range``, the pessimistic clipped form of
    OpenAI Baselines' PPO2: max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    Example:
        >>> values, old, returns = torch.tensor([1.0, 2.0]), torch.zeros(2), torch.tensor([0.5, 3.0])
        >>> float(value_loss(values, old, returns)), float(value_loss(values, old, returns, clip_range=0.5))
        (0.625, 3.25)
    """
    error = (values - returns).square()
    if clip_range is not None:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        error = torch.maximum(error, (clipped - returns).square())
    return masked_mean(error, mask)
