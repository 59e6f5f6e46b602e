"""Proximal policy optimisation (Schulman, Wolski, Dhariwal, Radford, Klimov; arXiv 1707.06347, 2017) for continuous
actions: a Gaussian actor-critic, the clipped objective, and rollouts from a gymnasium vector env.

* :class:`GaussianActorCritic`: separate actor and critic MLPs (default 64-64 tanh, orthogonal init, as
  Stable-Baselines3's PPO). The std is a state-independent parameter (SB3's default), or, with ``era``, state
  dependent through :class:`entreg.nn.GaussianERA`, whose entropy equals its target in every state unless a
  log-std reaches its floor (PPO+ERA, Kang et al. 2025; the entropy bonus is then pointless and off).
* :func:`normalize_advantages` and the loss terms of :mod:`entreg.policy_gradient` (``clipped_surrogate_loss``,
  ``value_loss``), with a mask for steps that must not train (non-finite rewards or observations, autoreset steps).
* :class:`RolloutCollector`: steps a vector env (both gymnasium 1.x autoreset modes), normalises observations and
  scales rewards as RL-Zoo's ``VecNormalize`` (running statistics updated every step; final observations are not
  counted, as there), clips actions to the bounds when stepping (the unclipped sample is what is trained on),
  masks non-finite steps with a warning and can save and restore the exact state of MuJoCo envs.

The Lightning glue (update epochs, DDP, checkpoints, logging) is :class:`entreg.modules.ppo.PPOModule`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from entreg.distributions import gaussian_entropy, gaussian_log_prob
from entreg.nn.era import GaussianERA
from entreg.nn.mlp import mlp
from entreg.policy_gradient import masked_mean
from entreg.rl.envs import get_env_state, set_env_state
from entreg.rl.normalization import RunningMeanStd

__all__ = ["GaussianActorCritic", "Rollout", "RolloutCollector", "normalize_advantages"]


class GaussianActorCritic(nn.Module):
    """A diagonal Gaussian policy and a state-value critic, as two separate MLPs.

    Args:
        obs_dim, action_dim: sizes of the (flat) observation and action.
        hidden: hidden widths of both MLPs (SB3's PPO: 64, 64).
        activation: ``"tanh"`` (SB3's PPO) or another name of timm's ``get_act_layer`` (``"relu"``, ``"elu"``...).
        log_std_init: initial value of the state-independent log-std (without ``era``).
        ortho_init: orthogonal init with gains sqrt(2) (hidden), 0.01 (actor output), 1 (critic output), zero biases.
        era: a :class:`entreg.nn.GaussianERA`; the actor then outputs a mean and log-std scores per state, and the
            policy's entropy equals ``era.target_entropy`` in every state (more only where a log-std hits its floor).

    Example:
        >>> net = GaussianActorCritic(3, 2, era=GaussianERA(2, target_entropy=-1.0))
        >>> mean, log_std = net.policy(torch.randn(5, 3))
        >>> torch.allclose(net.entropy(log_std), torch.full((5,), -1.0))
        True
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        log_std_init: float = 0.0,
        ortho_init: bool = True,
        era: GaussianERA | None = None,
    ) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(f"obs_dim and action_dim must be >= 1, got {obs_dim}, {action_dim}")
        if era is not None and era.action_dim != action_dim:
            raise ValueError(f"era was built for action_dim={era.action_dim}, the policy has {action_dim}")
        hidden = tuple(hidden)
        self.action_dim = action_dim
        self.era = era
        outputs = 2 * action_dim if era is not None else action_dim
        self.actor = mlp(obs_dim, hidden, outputs, activation, 0.01 if ortho_init else None)
        self.critic = mlp(obs_dim, hidden, 1, activation, 1.0 if ortho_init else None)
        self.log_std = None if era is not None else nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def policy(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std of the action distribution, both (..., action_dim)."""
        out = self.actor(obs)
        if self.era is None:
            return out, self.log_std.expand_as(out)
        mean, scores = out.split(self.action_dim, dim=-1)
        return self.era(mean, scores)

    def value(self, obs: Tensor) -> Tensor:
        """State value, shape (...)."""
        return self.critic(obs).squeeze(-1)

    @staticmethod
    def entropy(log_std: Tensor) -> Tensor:
        """Entropy of the diagonal Gaussian with these log-stds, shape (...)."""
        return gaussian_entropy(log_std)


def normalize_advantages(advantages: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """(A - mean) / (std + eps) over the masked entries (std with Bessel's correction, as SB3 per minibatch)."""
    mean = masked_mean(advantages, mask)
    n = advantages.numel() if mask is None else int(mask.sum())
    if n < 2:
        return advantages - mean
    var = masked_mean((advantages - mean).square(), mask) * n / (n - 1)
    return (advantages - mean) / (var.sqrt() + eps)


@dataclass
class Rollout:
    """``n_steps`` steps of ``num_envs`` envs, time first.

    ``obs`` are normalised as the policy saw them; ``next_obs`` follow each step (the next step's ``obs``, or the
    final observation where a same-step autoreset ended an episode, normalised with the statistics of that
    step, so both sides of a TD error share one normalisation); ``actions`` are the unclipped samples;
    ``rewards`` are scaled and 0 where ``valid`` is False. A step is invalid when it is the reset step of
    next-step autoreset or its observation, reward or next observation is not finite.
    """

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    nonfinite_steps: int = 0
    # the observations and discounted returns counted into the normalisers during this rollout (for DDP merging)
    obs_moments: tuple[Tensor, Tensor, float] | None = None
    return_moments: tuple[Tensor, Tensor, float] | None = None


def _moments(samples: list[np.ndarray], shape: tuple[int, ...]) -> tuple[Tensor, Tensor, float]:
    x = torch.from_numpy(np.concatenate(samples).reshape(-1, *shape)) if samples else torch.zeros(0, *shape)
    x = x.double()
    if len(x) == 0:
        return torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64), 0.0
    return x.mean(0), x.var(0, unbiased=False), float(len(x))


class RolloutCollector:
    """Collects on-policy rollouts from a gymnasium vector env with Box observations and actions.

    Args:
        envs: a gymnasium 1.x vector env (``autoreset_mode`` next-step or same-step).
        obs_rms: observation statistics to normalise with (None: raw observations). They are not changed here:
            each rollout normalises with a copy updated at every step, and the caller merges
            :attr:`Rollout.obs_moments` into ``obs_rms`` afterwards (over all DDP ranks).
        return_rms: statistics of the discounted return for reward scaling (None: raw rewards), idem.
        gamma: discount of that return.
    """

    def __init__(
        self,
        envs: Any,
        obs_rms: RunningMeanStd | None = None,
        return_rms: RunningMeanStd | None = None,
        gamma: float = 0.99,
    ) -> None:
        from gymnasium.spaces import Box
        from gymnasium.vector import AutoresetMode

        obs_space, action_space = envs.single_observation_space, envs.single_action_space
        if not (isinstance(obs_space, Box) and isinstance(action_space, Box)):
            raise ValueError(f"PPO here needs Box observations and actions, got {obs_space} and {action_space}")
        mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"the vector env's autoreset_mode must be next-step or same-step, got {mode}")
        self.envs = envs
        self.next_step_reset = mode == AutoresetMode.NEXT_STEP
        self.num_envs = envs.num_envs
        self.obs_shape = tuple(obs_space.shape)
        self.low, self.high = action_space.low, action_space.high
        self.obs_rms, self.return_rms, self.gamma = obs_rms, return_rms, gamma
        self.obs: np.ndarray | None = None  # raw observation each env acts on next
        self.reset_step = np.zeros(self.num_envs, dtype=bool)  # next-step autoreset: the next step is a reset
        self.episode_return = np.zeros(self.num_envs)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)
        self.discounted_return = np.zeros(self.num_envs)

    def reset(self, seed: int | None = None) -> None:
        """Reset every env (env i seeded ``seed + i`` by gymnasium) and the episode accumulators."""
        self.obs, _ = self.envs.reset(seed=seed)
        self.reset_step[:] = False
        self.episode_return[:] = 0.0
        self.episode_length[:] = 0
        self.discounted_return[:] = 0.0

    def normalize(self, obs: np.ndarray, rms: RunningMeanStd | None = None) -> Tensor:
        """Float32 observations normalised by ``rms`` (default ``obs_rms``); non-finite entries become 0."""
        rms = self.obs_rms if rms is None else rms
        x = rms.normalize(obs) if rms is not None else obs
        return torch.from_numpy(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)).float()

    @torch.no_grad()
    def collect(self, policy: GaussianActorCritic, n_steps: int, generator: torch.Generator) -> Rollout:
        """Step every env ``n_steps`` times with actions sampled from ``policy`` (noise from ``generator``, on CPU)."""
        if self.obs is None:
            raise RuntimeError("call reset() before collect()")
        device = next(policy.parameters()).device
        n, d = self.num_envs, self.low.shape[0]
        obs_rms = copy.deepcopy(self.obs_rms)
        return_rms = copy.deepcopy(self.return_rms)
        obs_buf = torch.zeros(n_steps, n, *self.obs_shape)
        final_obs = torch.zeros(n_steps, n, *self.obs_shape)  # same-step autoreset: final observations
        actions = torch.zeros(n_steps, n, d)
        log_probs = torch.zeros(n_steps, n)
        rewards = np.zeros((n_steps, n))
        flags = np.zeros((4, n_steps, n), dtype=bool)  # terminated, truncated, valid, real transition
        counted_obs: list[np.ndarray] = []
        counted_returns: list[np.ndarray] = []
        episode_returns: list[float] = []
        episode_lengths: list[int] = []
        for t in range(n_steps):
            obs_ok = np.isfinite(self.obs).all(axis=tuple(range(1, self.obs.ndim)))
            counted = obs_ok & ~self.reset_step  # not the final observation of next-step autoreset (as SB3)
            if obs_rms is not None and counted.any():
                counted_obs.append(self.obs[counted])
                obs_rms.update(self.obs[counted])
            x = self.normalize(self.obs, obs_rms)
            obs_buf[t] = x
            mean, log_std = policy.policy(x.to(device))
            noise = torch.randn(n, d, generator=generator).to(device)
            action = mean + torch.exp(log_std) * noise
            actions[t] = action.cpu()
            log_probs[t] = gaussian_log_prob(action, mean, log_std).cpu()
            obs, reward, terminated, truncated, info = self.envs.step(np.clip(actions[t].numpy(), self.low, self.high))
            done = terminated | truncated
            real = ~self.reset_step
            boot = obs
            if not self.next_step_reset and done.any():
                boot = obs.copy()
                boot[done] = np.stack([info["final_obs"][i] for i in np.flatnonzero(done)])
                final_obs[t] = self.normalize(boot, obs_rms)
            reward_ok = np.isfinite(reward)
            boot_ok = np.isfinite(boot).all(axis=tuple(range(1, boot.ndim)))
            flags[:, t] = terminated, truncated, real & obs_ok & reward_ok & boot_ok, real
            finite_reward = np.where(real & reward_ok, reward, 0.0)
            self.episode_return += finite_reward
            self.episode_length += real
            self.discounted_return = np.where(real, self.discounted_return * self.gamma + finite_reward, 0.0)
            if return_rms is not None and real.any():
                counted_returns.append(self.discounted_return[real])
                return_rms.update(self.discounted_return[real])
                finite_reward = return_rms.scale(finite_reward)
            rewards[t] = finite_reward
            for i in np.flatnonzero(done & real):
                episode_returns.append(float(self.episode_return[i]))
                episode_lengths.append(int(self.episode_length[i]))
            self.episode_return[done] = 0.0
            self.episode_length[done] = 0
            self.discounted_return[done] = 0.0
            self.reset_step = done if self.next_step_reset else np.zeros_like(done)
            self.obs = obs
        terminated_, truncated_, valid, real = (torch.from_numpy(f) for f in flags)
        bad = int((real & ~valid).sum())
        if bad:
            warnings.warn(
                f"{bad} of {n_steps * n} steps had a non-finite observation or reward: masked out of the update",
                RuntimeWarning,
                stacklevel=2,
            )
        return Rollout(
            obs=obs_buf,
            actions=actions,
            log_probs=log_probs,
            rewards=torch.from_numpy(rewards).float(),
            next_obs=self._next_obs(obs_buf, final_obs, terminated_ | truncated_, obs_rms),
            terminated=terminated_,
            truncated=truncated_,
            valid=valid,
            episode_returns=episode_returns,
            episode_lengths=episode_lengths,
            nonfinite_steps=bad,
            obs_moments=_moments(counted_obs, self.obs_shape) if obs_rms is not None else None,
            return_moments=_moments(counted_returns, ()) if return_rms is not None else None,
        )

    def _next_obs(self, obs: Tensor, final_obs: Tensor, done: Tensor, obs_rms: RunningMeanStd | None) -> Tensor:
        next_obs = torch.cat([obs[1:], self.normalize(self.obs, obs_rms)[None]])
        if not self.next_step_reset:
            next_obs[done] = final_obs[done]
        return next_obs

    def state_dict(self) -> dict[str, Any]:
        """The collector's position: current observations, pending resets, episode accumulators and, for
        MuJoCo envs, every sub-env's exact state (:func:`entreg.rl.envs.get_env_state`; else ``envs`` is None)."""
        return {
            "obs": torch.from_numpy(np.asarray(self.obs)).clone() if self.obs is not None else None,
            "reset_step": torch.from_numpy(self.reset_step.copy()),
            "episode_return": torch.from_numpy(self.episode_return.copy()),
            "episode_length": torch.from_numpy(self.episode_length.copy()),
            "discounted_return": torch.from_numpy(self.discounted_return.copy()),
            "envs": _env_states(self.envs),
        }

    def load_state_dict(self, state: dict[str, Any], seed: int | None = None) -> bool:
        """Restore a :meth:`state_dict`. Returns False (and resets the envs with ``seed``) when the saved state
        has no env states or does not fit these envs: the episodes in progress are then lost."""
        envs_state = state.get("envs")
        if envs_state is None or state.get("obs") is None or len(envs_state) != self.num_envs:
            self.reset(seed)
            return False
        for env, env_state in zip(self.envs.envs, envs_state, strict=True):
            set_env_state(env, env_state)
        self.obs = state["obs"].numpy().copy()
        self.reset_step = state["reset_step"].numpy().copy()
        if self.next_step_reset:
            self.envs._autoreset_envs = self.reset_step.copy()  # SyncVectorEnv's pending next-step resets
        self.episode_return = state["episode_return"].numpy().copy()
        self.episode_length = state["episode_length"].numpy().copy()
        self.discounted_return = state["discounted_return"].numpy().copy()
        return True


def _env_states(envs: Any) -> list[dict[str, Any]] | None:
    """:func:`entreg.rl.envs.get_env_state` of every sub-env of a SyncVectorEnv; None unless all are MuJoCo envs."""
    states = [get_env_state(env) for env in getattr(envs, "envs", ())]
    return None if not states or any(state is None for state in states) else states
