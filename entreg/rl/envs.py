"""Gymnasium environments for entreg's agents: construction, seeded deterministic evaluation, exact env state.

gymnasium and MuJoCo are an optional extra (``pip install "entreg[rl]"``); they are imported on first use, so
``import entreg`` works without them. DeepMind Control tasks (``dm_control/<domain>-<task>-v0``, e.g.
``dm_control/cheetah-run-v0``) come through shimmy with the extra ``entreg[dmc]``: their observation dict is flattened
into one vector (its entries in the order of the observation space); their episodes end only by the time limit
(truncated, never terminated).

* :func:`make_env` / :func:`make_vector_env`: ``gymnasium.make`` wrapped in ``RecordEpisodeStatistics``, with a
  clear error for unknown ids; a ``SyncVectorEnv`` whose env ``i`` is seeded ``seed + i``.
* :func:`evaluate`: deterministic episodes with fixed seeds, so two evaluations of one policy are identical;
  :class:`Evaluation`: the record both agents' ``evaluate()`` return (env step, seed, the episodes' returns).
* :func:`get_env_state` / :func:`set_env_state`: the exact state of a MuJoCo env (simulator integration state,
  the env's RNG, time-limit and episode-statistics counters), so a resumed run continues the same episode.

Example:
    >>> env = make_env("InvertedPendulum-v5", seed=0)
    >>> obs, _ = env.reset(seed=0)
    >>> obs.shape
    (4,)
    >>> returns = evaluate(lambda obs: torch.zeros(1, 1), "InvertedPendulum-v5", episodes=2, seed=0)
    >>> returns == evaluate(lambda obs: torch.zeros(1, 1), "InvertedPendulum-v5", episodes=2, seed=0)
    True
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DM_CONTROL_PREFIX",
    "MUJOCO_IDS",
    "POLICY_TAGS",
    "Evaluation",
    "env_spaces",
    "evaluate",
    "get_env_state",
    "make_env",
    "make_vector_env",
    "require_gymnasium",
    "set_env_state",
]

MUJOCO_IDS = ("InvertedPendulum-v5", "Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
DM_CONTROL_PREFIX = "dm_control/"  # shimmy's DeepMind Control ids, e.g. dm_control/cheetah-run-v0
# what both agents (SACModule, PPOModule) log about their policy's noise: the Gaussian's mean std over states and
# dimensions, the acting policy's entropy, the Gaussian's entropy before any bounding (ERA's constrained quantity)
POLICY_TAGS = ("policy/std", "policy/entropy", "policy/gaussian_entropy")


@dataclass(frozen=True)
class Evaluation:
    """The returns of deterministic evaluation episodes seeded ``seed, seed + 1, ...`` after ``step`` env steps of
    training: what ``SACModule.evaluate()`` and ``PPOModule.evaluate()`` return (logged as ``eval/return``, the mean).
    It reads as the sequence of returns (``len``, iteration, ``np.mean(record)``).

    Example:
        >>> record = Evaluation(step=2000, seed=10_000, returns=(10.0, 14.0))
        >>> record.mean_return, float(np.mean(record)), record.as_dict()["returns"]
        (12.0, 12.0, [10.0, 14.0])
    """

    step: int
    seed: int
    returns: tuple[float, ...]

    @property
    def mean_return(self) -> float:
        return math.fsum(self.returns) / len(self.returns)

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """A JSON-ready dict: step, seed, mean (the mean return), returns."""
        return {"step": self.step, "seed": self.seed, "mean": self.mean_return, "returns": list(self.returns)}

    def __len__(self) -> int:
        return len(self.returns)

    def __iter__(self) -> Iterator[float]:
        return iter(self.returns)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self.returns, dtype=dtype)


def require_gymnasium() -> ModuleType:
    """The ``gymnasium`` module, or an ImportError that says how to install it."""
    try:
        import gymnasium
    except ImportError as err:  # pragma: no cover - the test environment has the extra
        raise ImportError(
            'entreg.rl needs gymnasium with MuJoCo: pip install "entreg[rl]" (or "gymnasium[mujoco]>=1.0")'
        ) from err
    return gymnasium


def make_env(env_id: str, seed: int | None = None, **kwargs: Any) -> Any:
    """``gymnasium.make(env_id, **kwargs)`` wrapped in ``RecordEpisodeStatistics``.

    With ``seed`` the action space is seeded with it; the simulator is seeded by the first ``reset(seed=...)``,
    as gymnasium intends. Unknown ids raise a ValueError that lists the MuJoCo ids entreg's configs use.
    """
    gym = require_gymnasium()
    if env_id.startswith(DM_CONTROL_PREFIX):
        _register_dm_control(gym)
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as err:
        raise ImportError(f'{env_id} needs a missing dependency ({err}): pip install "entreg[rl]"') from err
    except gym.error.Error as err:
        raise ValueError(
            f"unknown gymnasium env id {env_id!r} ({err}); MuJoCo ids include {', '.join(MUJOCO_IDS)}; DeepMind "
            f"Control ids look like {DM_CONTROL_PREFIX}cheetah-run-v0"
        ) from err
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def _register_dm_control(gym: ModuleType) -> None:
    """Register shimmy's ``dm_control/...`` ids with gymnasium, or say how to install them. On a machine without a
    display, GLFW's warning that DISPLAY is missing (at dm_control's import, before it falls back to EGL or OSMesa
    rendering, which training does not use) is dropped; other warnings of the import pass."""
    try:
        with warnings.catch_warnings():  # dm_control tries GLFW first; without a display it falls back to EGL/OSMesa
            warnings.filterwarnings("ignore", message=r".*The DISPLAY environment variable is missing")
            import shimmy
    except ImportError as err:
        raise ImportError(
            'DeepMind Control envs need dm_control and shimmy: pip install "entreg[dmc]" (or "shimmy[dm-control]>=2.0")'
        ) from err
    gym.register_envs(shimmy)
    absl = logging.getLogger("absl")  # where dm_control sends MuJoCo's warnings
    if _suite_deprecation not in absl.filters:
        absl.addFilter(_suite_deprecation)


def _suite_deprecation(record: logging.LogRecord) -> bool:
    """False for MuJoCo's deprecation of ``settotalmass``, which dm_control's own suite XML (cheetah, ...) still
    uses: logged at every env build (every evaluation), and nothing a user can change. Once a DeepMind Control env
    is made, the message is dropped for the whole process (MuJoCo's text names no file), a user's own XML too."""
    return "compiler attribute 'settotalmass' is deprecated" not in record.getMessage()


def make_vector_env(env_id: str, num_envs: int, seed: int, **kwargs: Any) -> Any:
    """A ``SyncVectorEnv`` of ``num_envs`` :func:`make_env` envs, reset once with seeds ``seed .. seed+num_envs-1``.

    Gymnasium's default next-step autoreset applies: after an episode ends, the next ``step`` call resets that
    env (its action is ignored) and returns the first observation of the new episode.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    gym = require_gymnasium()
    envs = gym.vector.SyncVectorEnv([lambda i=i: make_env(env_id, seed + i, **kwargs) for i in range(num_envs)])
    envs.reset(seed=seed)
    return envs


def env_spaces(env_id: str, **kwargs: Any) -> tuple[Any, Any]:
    """(observation_space, action_space) of ``env_id`` (an env is built and closed)."""
    env = make_env(env_id, **kwargs)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


@torch.no_grad()
def evaluate(act: Callable[[Tensor], Tensor], env_id: str, episodes: int, seed: int, **kwargs: Any) -> list[float]:
    """Returns of ``episodes`` episodes of ``env_id`` with actions from ``act``; episode ``k`` is seeded ``seed + k``.

    ``act`` maps a float32 observation tensor of shape (1, obs_dim) to an action tensor (1, action_dim) in the
    env's action units, and should be deterministic (e.g. the policy's mean); actions are clipped to the bounds.
    ``kwargs`` go to :func:`make_env`.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = make_env(env_id, **kwargs)
    low, high = env.action_space.low, env.action_space.high
    returns = []
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            total, done = 0.0, False
            while not done:
                x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1)
                action = act(x).detach().cpu().numpy().reshape(low.shape)
                obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def _layers(env: Any) -> list[Any]:
    layers, layer = [], env
    while layer is not None:
        layers.append(layer)
        layer = getattr(layer, "env", None)
    return layers


def _simulator(base: Any) -> tuple[Any, Any] | None:
    """The MuJoCo ``(MjModel, MjData)`` of an unwrapped env: gymnasium's MuJoCo envs, or a DeepMind Control task
    through shimmy (its physics' raw structs); None for other envs."""
    if hasattr(base, "model") and hasattr(base, "data"):
        return base.model, base.data
    physics = getattr(getattr(base, "_env", None), "physics", None)
    if physics is not None and hasattr(physics.model, "ptr"):
        return physics.model.ptr, physics.data.ptr
    return None


def _rng_state(rng: Any) -> Any:
    """The state of a numpy ``Generator`` (gymnasium) or legacy ``RandomState`` (dm_control's tasks; its key array
    as a tensor, so that checkpoints hold no numpy arrays)."""
    if hasattr(rng, "bit_generator"):
        return copy.deepcopy(rng.bit_generator.state)
    name, keys, position, has_gauss, cached = rng.get_state()
    return {"legacy": [name, torch.from_numpy(keys.copy()), int(position), int(has_gauss), float(cached)]}


def _set_rng_state(rng: Any, state: Any) -> None:
    if "legacy" in state:
        name, keys, position, has_gauss, cached = state["legacy"]
        rng.set_state((name, keys.numpy(), position, has_gauss, cached))
    else:
        rng.bit_generator.state = copy.deepcopy(state)


def get_env_state(env: Any) -> dict[str, Any] | None:
    """The exact state of a (wrapped) MuJoCo env: the full simulator integration state (``mj_getState``), the
    env's numpy RNG, the time-limit step counter and the episode-statistics counters; for a DeepMind Control task
    also its task RNG and step counter. None for other envs."""
    base = env.unwrapped
    simulator = _simulator(base)
    if simulator is None:
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    sim = np.empty(mujoco.mj_stateSize(simulator[0], spec))
    mujoco.mj_getState(*simulator, sim, spec)
    layers = _layers(env)
    state = {
        "mujoco": torch.from_numpy(sim),
        "np_random": _rng_state(base.np_random),
        "elapsed_steps": [int(w._elapsed_steps or 0) for w in layers if hasattr(w, "_elapsed_steps")],
        "episode_stats": [
            (float(w.episode_returns), int(w.episode_lengths)) for w in layers if hasattr(w, "episode_returns")
        ],
    }
    if not hasattr(base, "model"):  # dm_control (its task's RNG is np_random): the episode's step count
        state["dm_control"] = {"step_count": base._env._step_count, "reset_next_step": base._env._reset_next_step}
    return state


def set_env_state(env: Any, state: dict[str, Any]) -> None:
    """Restore a :func:`get_env_state` state into a freshly made env of the same id (it is reset first, as
    gymnasium's wrappers require, then overwritten)."""
    import mujoco

    env.reset()
    base = env.unwrapped
    model, data = _simulator(base)
    mujoco.mj_setState(model, data, state["mujoco"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    _set_rng_state(base.np_random, state["np_random"])
    if "dm_control" in state:
        control, saved = base._env, state["dm_control"]
        control._step_count, control._reset_next_step = saved["step_count"], saved["reset_next_step"]
        control.physics.forward()  # the derived quantities dm_control's next step starts from
    layers = _layers(env)
    limits = [w for w in layers if hasattr(w, "_elapsed_steps")]
    stats = [w for w in layers if hasattr(w, "episode_returns")]
    for layer, steps in zip(limits, state["elapsed_steps"], strict=True):
        layer._elapsed_steps = steps
    for layer, (ret, length) in zip(stats, state["episode_stats"], strict=True):
        layer.episode_returns, layer.episode_lengths = ret, length
