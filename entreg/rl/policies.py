"""Actor heads for continuous actions in [-1, 1]: a Gaussian squashed by tanh (SAC) or truncated to [-1, 1] (ERA).

:class:`GaussianActor` maps observations through an MLP to a mean and a log-std per action dimension and
samples with the reparameterisation trick, so losses differentiate through the action:

* ``squash="tanh"`` (Haarnoja et al. 2018, arXiv 1812.05905, and Stable-Baselines3): a = tanh(u),
  u ~ N(mean, std); log pi(a) = log N(u) - sum_i log(1 - tanh(u_i)^2), the last term written as
  2 (log 2 - u - softplus(-2u)) so it stays finite where tanh saturates (SB3 adds 1e-6 inside the log instead).
* ``squash="truncated"`` (ERA's released SAC code, Kang et al. 2025, arXiv 2510.08549): a ~ N(tanh(mean), std)
  truncated to [-1, 1], sampled by the inverse CDF; the mode tanh(mean) lies
  inside the interval, so the deterministic action is the same for both.

Without ``era`` the log-std comes from the head and is clamped to [log_std_min, log_std_max] (SB3: [-20, 2]).
With ``era`` (:class:`entreg.nn.GaussianERA`) the head's second half are raw scores and ERA sets the log-stds so
that the entropy of the Gaussian N(mean, std) (before squashing or truncation) equals the ERA target in every
state; with one action dimension this is a constant std, exp(target - 0.5 ln(2 pi e)).

Example:
    >>> actor = GaussianActor(obs_dim=3, action_dim=2)
    >>> action, log_prob, log_std = actor.sample(torch.randn(5, 3))
    >>> action.shape, log_prob.shape, bool(action.abs().max() <= 1)
    (torch.Size([5, 2]), torch.Size([5]), True)
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entreg.nn.era import GaussianERA

__all__ = ["ACTIVATIONS", "GaussianActor", "Squash", "mlp", "tanh_gaussian_log_prob", "truncated_gaussian_sample"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}
Squash = Literal["tanh", "truncated"]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
LOG_2 = math.log(2.0)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str = "relu") -> nn.Sequential:
    """Linear layers of widths ``in_dim, *hidden, out_dim`` with ``activation`` between them (PyTorch's default
    initialisation, as Stable-Baselines3's SAC)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    dims = (in_dim, *hidden)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


def tanh_gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log-density of a = tanh(u) for u ~ N(mean, exp(log_std)^2), summed over the last dim."""
    z = (u - mean) * torch.exp(-log_std)
    log_normal = -0.5 * z.square() - log_std - LOG_SQRT_2PI
    log_jacobian = 2.0 * (LOG_2 - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2)
    return (log_normal - log_jacobian).sum(-1)


def truncated_gaussian_sample(centre: Tensor, log_std: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
    """Reparameterised sample of N(centre, exp(log_std)^2) truncated to [-1, 1] and its log-density (summed over
    the last dim), from ``uniform`` noise in (0, 1) by the inverse CDF. ``centre`` must lie in [-1, 1].

    Computed in the inputs' dtype. The CDF value is kept inside (0, 1) (in float32 at most 1 - 2^-24, which cuts
    the Gaussian's tail beyond about 5.3 std above the centre: a probability below 1e-7), so the inverse CDF and
    its gradient stay finite; the sample is clamped to [-1, 1] against rounding.
    """
    finfo = torch.finfo(centre.dtype)
    s = torch.exp(log_std)
    cdf_low = torch.special.ndtr((-1.0 - centre) / s)
    mass = torch.special.ndtr((1.0 - centre) / s) - cdf_low
    p = (cdf_low + uniform * mass).clamp(finfo.tiny, 1.0 - finfo.eps / 2)
    x = (centre + s * torch.special.ndtri(p)).clamp(-1.0, 1.0)
    z = (x - centre) / s
    log_prob = (-0.5 * z.square() - log_std - LOG_SQRT_2PI - torch.log(mass)).sum(-1)
    return x, log_prob


class GaussianActor(nn.Module):
    """A state-dependent diagonal Gaussian policy on [-1, 1]^D, tanh-squashed or truncated (see the module doc).

    Args:
        obs_dim, action_dim: sizes of the flat observation and action.
        hidden, activation: the MLP body (SB3's SAC: 256-256 ReLU).
        log_std_min, log_std_max: clamp of the head's log-std without ``era`` (SB3: -20 and 2).
        era: a :class:`entreg.nn.GaussianERA` for ``action_dim`` dims: the head's log-std outputs become ERA scores.
        squash: ``"tanh"`` or ``"truncated"``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "relu",
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
        era: GaussianERA | None = None,
        squash: Squash = "tanh",
    ) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(f"obs_dim and action_dim must be >= 1, got {obs_dim}, {action_dim}")
        if squash not in ("tanh", "truncated"):
            raise ValueError(f"squash must be 'tanh' or 'truncated', got {squash!r}")
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min ({log_std_min}) must be < log_std_max ({log_std_max})")
        if era is not None and era.action_dim != action_dim:
            raise ValueError(f"era was built for action_dim={era.action_dim}, the actor has {action_dim}")
        self.action_dim = action_dim
        self.squash: Squash = squash
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        self.era = era
        self.net = mlp(obs_dim, tuple(hidden), 2 * action_dim, activation)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std of the Gaussian before squashing/truncation, each (..., action_dim)."""
        mean, scores = self.net(obs).chunk(2, dim=-1)
        if self.era is not None:
            return self.era(mean, scores)
        return mean, scores.clamp(self.log_std_min, self.log_std_max)

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """A reparameterised action in [-1, 1] per observation, its log-probability and the Gaussian's log-std.
        The noise comes from ``generator`` (on the observations' device) or torch's global RNG."""
        mean, log_std = self(obs)
        if self.squash == "tanh":
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            u = mean + torch.exp(log_std) * noise
            return torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std), log_std
        uniform = torch.rand(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        action, log_prob = truncated_gaussian_sample(torch.tanh(mean), log_std, uniform)
        return action, log_prob, log_std

    def mode(self, obs: Tensor) -> Tensor:
        """The deterministic action tanh(mean) (the mode of the truncated Gaussian; the tanh of the Gaussian's)."""
        return torch.tanh(self(obs)[0])
