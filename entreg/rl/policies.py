"""Actor heads for continuous actions in [-1, 1]: a Gaussian squashed by tanh (SAC) or truncated to [-1, 1] (ERA).

:class:`GaussianActor` maps observations through an MLP to a mean and a log-std per action dimension and
samples with the reparameterisation trick, so losses differentiate through the action:

* ``squash="tanh"`` (Haarnoja et al. 2018, arXiv 1812.05905, and Stable-Baselines3): a = tanh(u),
  u ~ N(mean, std); log pi(a) = log N(u) - sum_i log(1 - tanh(u_i)^2), finite where tanh saturates
  (:func:`entreg.distributions.tanh_gaussian_log_prob`).
* ``squash="truncated"`` (ERA's released SAC code, Kang et al. 2025, arXiv 2510.08549): a ~ N(tanh(mean), std)
  truncated to [-1, 1], sampled by the inverse CDF (:func:`entreg.distributions.truncated_gaussian_sample`); the
  mode tanh(mean) lies inside the interval, so the deterministic action is the same for both.

ERA's code truncates to [-b, b] with b = 1 - 1e-6 and clips the centre to the same interval (``action_bound``; the
default 1 is the interval itself): the sample is b times a draw truncated to [-1, 1] with centre tanh(mean) / b and
std / b, its log-density lowered by D log b.

Without ``era`` the log-std comes from the head and is clamped to [log_std_min, log_std_max] (SB3: [-20, 2]);
``log_std_init`` starts it at one value in every state (the log-std head's weights zero, its biases that value), the
start of a control arm with ERA's initial entropy and no floor.
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

import math
from typing import Literal

import torch
from torch import Tensor, nn

from entreg.distributions import tanh_gaussian_log_prob, truncated_gaussian_sample
from entreg.nn.era import GaussianERA
from entreg.nn.mlp import mlp

__all__ = ["GaussianActor", "Squash"]

Squash = Literal["tanh", "truncated"]


class GaussianActor(nn.Module):
    """A state-dependent diagonal Gaussian policy on [-1, 1]^D, tanh-squashed or truncated (see the module doc).

    Args:
        obs_dim, action_dim: sizes of the flat observation and action.
        hidden, activation: the MLP body (SB3's SAC: 256-256 ReLU; any name of timm's ``get_act_layer``).
        log_std_min, log_std_max: clamp of the head's log-std without ``era`` (SB3: -20 and 2).
        era: a :class:`entreg.nn.GaussianERA` for ``action_dim`` dims: the head's log-std outputs become ERA scores.
        squash: ``"tanh"`` or ``"truncated"``.
        ortho_init: orthogonal initialisation with zero biases, gain sqrt(2) for the hidden layers and the mean head,
            1 for the log-std (or ERA score) head, as ERA's released actor (False: PyTorch's default, as SB3's SAC).
        action_bound: b in (0, 1]: the truncated Gaussian lives on [-b, b], its centre clipped to it (ERA's code:
            1 - 1e-6); ignored by ``squash="tanh"``.
        log_std_init: without ``era``: the log-std in every state at initialisation, in [log_std_min, log_std_max]
            (the head's log-std weights zero, its biases this value; both learned). None: the head's initialisation.
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
        ortho_init: bool = False,
        action_bound: float = 1.0,
        log_std_init: float | None = None,
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
        if not 0.0 < action_bound <= 1.0:
            raise ValueError(f"action_bound must be in (0, 1], got {action_bound}")
        if log_std_init is not None:
            if era is not None:
                raise ValueError("log_std_init sets the initial std without ERA: ERA sets its own")
            if not log_std_min <= log_std_init <= log_std_max:
                raise ValueError(f"log_std_init must be in [{log_std_min}, {log_std_max}], got {log_std_init}")
        self.action_dim = action_dim
        self.action_bound = float(action_bound)
        self.squash: Squash = squash
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        self.era = era
        self.net = mlp(obs_dim, tuple(hidden), 2 * action_dim, activation, math.sqrt(2) if ortho_init else None)
        if ortho_init:  # the log-std head: gain 1 (ERA's `log_std_scale`)
            nn.init.orthogonal_(self.net[-1].weight.data[action_dim:], gain=1.0)
        if log_std_init is not None:
            nn.init.zeros_(self.net[-1].weight.data[action_dim:])
            nn.init.constant_(self.net[-1].bias.data[action_dim:], log_std_init)

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
        b = self.action_bound
        if b == 1.0:
            action, log_prob = truncated_gaussian_sample(torch.tanh(mean), log_std, uniform)
            return action, log_prob, log_std
        centre = torch.tanh(mean).clamp(-b, b) / b
        action, log_prob = truncated_gaussian_sample(centre, log_std - math.log(b), uniform)
        return b * action, log_prob - self.action_dim * math.log(b), log_std

    def mode(self, obs: Tensor) -> Tensor:
        """The deterministic action tanh(mean) (the mode of the truncated Gaussian, clipped to ``action_bound``; the
        tanh of the Gaussian's)."""
        mode = torch.tanh(self(obs)[0])
        if self.squash == "truncated" and self.action_bound < 1.0:
            mode = mode.clamp(-self.action_bound, self.action_bound)
        return mode
