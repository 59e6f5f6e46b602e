"""Group-relative advantages and the PPO-clipped policy loss of GRPO for flow models.

GRPO (Shao et al. 2024, DeepSeekMath) scores every sample against the other samples of its group, the samples
that share a prompt (Flow-GRPO, arXiv 2505.05470; code yifan123/flow_grpo @ ac4c86e, ``stat_tracking.py``) or,
in G2RPO and E-GRPO, a branch point (arXiv 2601.00423): ``A = (r - mean_group) / (std_group + eps)``, clipped
to ``[-clip, clip]`` (5 in the references). The policy loss per stochastic transition is PPO's
``max(-A rho, -A clip(rho, 1 - c, 1 + c))`` with ``rho = exp(log pi - log pi_old)``
(:func:`entreg.policy_gradient.clipped_surrogate_loss`, with :data:`KL_ESTIMATOR` for its ``approx_kl``).

Our addition (not in the papers): :func:`kde_entropy_bonus`, a per-sample kernel estimate of ``-log p(x)``
from the samples of the same prompt; adding ``lambda`` times it to the reward makes GRPO maximise
``E[r] + lambda H(p)`` (the expected ``-log p`` is the entropy), which pushes samples towards less crowded
regions instead of collapsing onto one of several equally rewarded modes.

Example:
    >>> import torch
    >>> adv = group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    >>> [round(a, 3) for a in adv.tolist()]  # std is the population std; a constant group gets 0
    [-1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entreg.policy_gradient import KLEstimator

__all__ = ["ADVANTAGE_STDS", "KL_ESTIMATOR", "group_advantages", "kde_entropy_bonus"]

KL_ESTIMATOR: KLEstimator = "k1"  # GRPO's approx_kl: mean(log pi_old - log pi)


ADVANTAGE_STDS = ("population", "unbiased")


def group_advantages(
    rewards: Tensor, groups: Tensor, eps: float = 1e-4, clip: float = 5.0, std: str = "population"
) -> Tensor:
    """(r - mean of its group) / (std of its group + eps), clipped to [-clip, clip] (0 for every member of a
    constant group, also with ``eps = 0``); ``groups`` holds integer group ids (any values) aligned with
    ``rewards`` (1-D).

    ``std="population"`` (entreg's default, divides by n) or ``"unbiased"`` (divides by n - 1: E-GRPO's released
    code, ``torch.std`` with ``eps = 1e-8``; with G = 12 entreg's advantages are sqrt(12 / 11) = 4.4% larger).

    Example:
        >>> r, g = torch.tensor([0.0, 2.0]), torch.zeros(2, dtype=torch.long)
        >>> group_advantages(r, g, eps=0.0).tolist(), group_advantages(r, g, eps=0.0, std="unbiased").tolist()
        ([-1.0, 1.0], [-0.7071067690849304, 0.7071067690849304])
    """
    if std not in ADVANTAGE_STDS:
        raise ValueError(f"std must be one of {ADVANTAGE_STDS}, got {std!r}")
    if rewards.ndim != 1 or groups.shape != rewards.shape:
        raise ValueError(
            f"rewards and groups must be 1-D of equal length, got {tuple(rewards.shape)}, {tuple(groups.shape)}"
        )
    if eps < 0 or clip <= 0:
        raise ValueError(f"need eps >= 0 and clip > 0, got {eps=}, {clip=}")
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(index.max()) + 1, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, index, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    dof = count if std == "population" else (count - 1).clamp_min(1)
    spread = (torch.zeros_like(count).index_add_(0, index, centred**2) / dof).sqrt()
    scale = spread[index] + eps
    return torch.where(scale > 0, centred / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0).clamp(-clip, clip)


def kde_entropy_bonus(samples: Tensor, populations: Tensor, bandwidth: float | None = None) -> Tensor:
    """-log of the Gaussian-kernel density of every sample among the samples of its population (e.g. its
    prompt), itself included: ``-log(mean_j exp(-|x_i - x_j|^2 / h))``, between 0 and ``log(n)``.

    The sample's own kernel bounds the bonus by ``log(n)``: without it (leave-one-out), a sample far from all
    others gets an unbounded bonus, and in our ring benchmark runs then flew off to |x| ~ 1e11.
    ``h`` (``bandwidth``, in squared distance units) defaults to SVGD's median heuristic, ``median |x_i - x_j|^2 /
    log(n)`` within each population. Samples are flattened; a population of one sample gets 0.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0]])
        >>> bonus = kde_entropy_bonus(x, torch.zeros(3, dtype=torch.long), bandwidth=1.0)
        >>> bool(bonus[2] > bonus[0]), bool(bonus.max() <= math.log(3))  # isolated: larger, but bounded
        (True, True)
    """
    if bandwidth is not None and bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    flat = samples.reshape(len(samples), -1).double()
    bonus = torch.zeros(len(samples), dtype=torch.float64, device=samples.device)
    for population in torch.unique(populations):
        rows = (populations == population).nonzero().flatten()
        n = len(rows)
        if n < 2:
            continue
        d2 = torch.cdist(flat[rows], flat[rows]).pow(2)
        off = ~torch.eye(n, dtype=torch.bool, device=d2.device)
        h = bandwidth if bandwidth is not None else float(d2[off].median()) / max(math.log(n), 1e-12)
        bonus[rows] = -(torch.logsumexp(-d2 / max(h, 1e-12), dim=1) - math.log(n))
    return bonus.to(samples.dtype)
