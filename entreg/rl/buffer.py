"""A uniform experience-replay buffer for off-policy agents (SAC), preallocated and exactly resumable.

Every transition (obs, action, reward, next_obs, terminated) is one row of a single preallocated float32 tensor,
so a minibatch is one gather; rows are drawn uniformly with a ``torch.Generator`` owned by the buffer, whose
state is part of :meth:`ReplayBuffer.state_dict`, so a resumed run samples exactly what the uninterrupted run
would. Transitions with a non-finite entry are refused and counted, never stored.

Example:
    >>> buffer = ReplayBuffer(capacity=100, obs_dim=3, action_dim=2, seed=0)
    >>> buffer.add(np.zeros(3), np.ones(2), 1.0, np.ones(3), False)
    True
    >>> buffer.add(np.zeros(3), np.ones(2), float("nan"), np.ones(3), False), buffer.rejected
    (False, 1)
    >>> batch = buffer.sample(4)
    >>> batch.obs.shape, batch.rewards.tolist()
    (torch.Size([4, 3]), [1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReplayBatch", "ReplayBuffer"]


class ReplayBatch(NamedTuple):
    """A minibatch of transitions: ``obs``, ``next_obs`` (B, obs_dim), ``actions`` (B, action_dim), ``rewards`` and
    ``terminated`` (B,) as floats (1.0 where the episode ended in a terminal state; truncation is not terminal)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor


class ReplayBuffer:
    """First-in-first-out replay of the last ``capacity`` transitions, sampled uniformly with replacement.

    Args:
        capacity: number of transitions kept (the oldest are overwritten).
        obs_dim, action_dim: sizes of the flat observation and action.
        device: where the storage and the sampling generator live (minibatches come out there).
        seed: seed of the sampling generator (None: a random seed from torch's global RNG).

    The storage is allocated with ``torch.empty`` (untouched pages cost no memory on Linux until written), as
    Stable-Baselines3 allocates its numpy buffers; ``state_dict`` holds only the rows written so far.
    """

    def __init__(
        self, capacity: int, obs_dim: int, action_dim: int, device: str | torch.device = "cpu", seed: int | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if obs_dim < 1 or action_dim < 1:
            raise ValueError(f"obs_dim and action_dim must be >= 1, got {obs_dim}, {action_dim}")
        self.capacity, self.obs_dim, self.action_dim = int(capacity), int(obs_dim), int(action_dim)
        self.device = torch.device(device)
        # row layout: obs | action | reward | next_obs | terminated
        self._split = (obs_dim, action_dim, 1, obs_dim, 1)
        self.width = sum(self._split)
        self.storage = torch.empty(self.capacity, self.width, dtype=torch.float32, device=self.device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.generator.manual_seed(seed)
        self.pos = 0
        self.size = 0
        self.rejected = 0

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray | Tensor,
        action: np.ndarray | Tensor,
        reward: float | np.ndarray | Tensor,
        next_obs: np.ndarray | Tensor,
        terminated: bool | np.ndarray | Tensor,
    ) -> bool | np.ndarray:
        """Store one transition, or a batch of them (a leading batch dimension on every argument).

        Returns whether it was stored (an array of flags for a batch): a transition with a NaN or infinite
        entry is refused and counted in :attr:`rejected`.
        """
        batched = np.ndim(reward) == 1
        rows = np.concatenate(
            [
                np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim),
                np.asarray(action, dtype=np.float32).reshape(-1, self.action_dim),
                np.asarray(reward, dtype=np.float32).reshape(-1, 1),
                np.asarray(next_obs, dtype=np.float32).reshape(-1, self.obs_dim),
                np.asarray(terminated, dtype=np.float32).reshape(-1, 1),
            ],
            axis=1,
        )
        ok = np.isfinite(rows).all(axis=1)
        self.rejected += int((~ok).sum())
        rows = rows[ok]
        n = len(rows)
        if n > self.capacity:  # only the last `capacity` rows would survive
            rows = rows[-self.capacity :]
            self.pos = (self.pos + n - self.capacity) % self.capacity
            n = self.capacity
        if n:
            first = min(n, self.capacity - self.pos)
            data = torch.from_numpy(rows).to(self.device)
            self.storage[self.pos : self.pos + first] = data[:first]
            if first < n:
                self.storage[: n - first] = data[first:]
            self.pos = (self.pos + n) % self.capacity
            self.size = min(self.size + n, self.capacity)
        return ok if batched else bool(ok[0])

    def sample(self, batch_size: int) -> ReplayBatch:
        """``batch_size`` transitions drawn uniformly with replacement (one gather from the storage)."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        index = torch.randint(0, self.size, (batch_size,), generator=self.generator, device=self.device)
        obs, actions, rewards, next_obs, terminated = self.storage[index].split(self._split, dim=1)
        return ReplayBatch(obs, actions, rewards.squeeze(1), next_obs, terminated.squeeze(1))

    def state_dict(self) -> dict[str, Any]:
        """The stored rows, write position, counters and sampling-generator state (tensors on the CPU)."""
        return {
            "capacity": self.capacity,
            "width": self.width,
            "storage": self.storage[: self.size].cpu().clone(),
            "pos": self.pos,
            "size": self.size,
            "rejected": self.rejected,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a buffer with the same capacity and dimensions."""
        if (state["capacity"], state["width"]) != (self.capacity, self.width):
            raise ValueError(
                f"replay buffer state is for capacity {state['capacity']} and row width {state['width']}, this "
                f"buffer has capacity {self.capacity} and width {self.width} (obs_dim {self.obs_dim}, "
                f"action_dim {self.action_dim})"
            )
        self.size, self.pos, self.rejected = int(state["size"]), int(state["pos"]), int(state["rejected"])
        self.storage[: self.size] = state["storage"].to(self.device)
        self.generator.set_state(state["generator"])
