"""Generalized advantage estimation (Schulman, Moritz, Levine, Jordan, Abbeel; arXiv 1506.02438, ICLR 2016).

Episodes that end inside a rollout are handled by the kind of ending:

* terminated (a true terminal state): the value after it is 0, and the trace is cut;
* truncated (a time limit): the value after it is the critic's value of the final observation, which the caller
  passes in ``next_values`` (gymnasium 1.x vector envs, next-step autoreset: the observation returned by the
  step that ended the episode is the final one; the next step resets), and the trace is cut.

Steps marked invalid (the reset step of next-step autoreset, or a step with a non-finite reward or observation)
get advantage 0 and cut the trace of the step before them, which then bootstraps from its next value.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gae"]


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Advantages and value targets (returns) of a rollout, tensors of shape (T, ...) with time first.

    With delta_t = r_t + gamma (1 - terminated_t) V'_t - V_t, where V'_t = ``next_values[t]`` is the value of
    the observation that follows step t (the final observation when step t ends an episode), and
    c_t = (1 - terminated_t)(1 - truncated_t):

        A_t = delta_t + gamma lam c_t A_{t+1},  A_T = 0,  returns_t = A_t + V_t.

    Invalid steps (``valid[t]`` False) have A_t = 0 whatever their (possibly non-finite) reward or value.

    Example:
        >>> r = torch.tensor([[1.0], [1.0], [1.0]])
        >>> v = torch.zeros(3, 1)
        >>> done = torch.tensor([[False], [True], [False]])
        >>> adv, ret = gae(r, v, v, terminated=done, truncated=torch.zeros_like(done), gamma=0.5, lam=1.0)
        >>> adv.squeeze(1).tolist()
        [1.5, 1.0, 1.0]
    """
    shapes = {t.shape for t in (rewards, values, next_values, terminated, truncated)}
    if valid is not None:
        shapes.add(valid.shape)
    if len(shapes) != 1 or rewards.ndim < 1:
        raise ValueError(f"gae needs tensors of one shape (T, ...), got shapes {sorted(shapes)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    not_terminal = (~terminated.bool()).to(values.dtype)
    continues = not_terminal * (~truncated.bool()).to(values.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values
    if valid is not None:
        deltas = torch.where(valid, deltas, torch.zeros_like(deltas))
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * lam * continues[t] * running
        if valid is not None:
            running = torch.where(valid[t], running, torch.zeros_like(running))
        advantages[t] = running
    return advantages, advantages + values
