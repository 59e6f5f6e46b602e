"""Reinforcement learning with entropy as a training signal: gymnasium envs, a replay buffer, SAC (+ERA), PPO (+ERA).

Needs the optional extra: ``pip install "entreg[rl]"`` (gymnasium with MuJoCo, and Stable-Baselines3 for the
parity benchmark). The Lightning modules are :class:`entreg.modules.sac.SACModule` and
:class:`entreg.modules.ppo.PPOModule`.
"""

from entreg.policy_gradient import clipped_surrogate_loss, value_loss
from entreg.rl.buffer import ReplayBatch, ReplayBuffer
from entreg.rl.envs import (
    env_spaces,
    evaluate,
    get_env_state,
    make_env,
    make_vector_env,
    require_gymnasium,
    set_env_state,
)
from entreg.rl.gae import gae
from entreg.rl.normalization import RunningMeanStd
from entreg.rl.policies import GaussianActor
from entreg.rl.ppo import GaussianActorCritic, RolloutCollector
from entreg.rl.sac import SAC, QEnsemble

__all__ = [
    "SAC",
    "GaussianActor",
    "GaussianActorCritic",
    "QEnsemble",
    "ReplayBatch",
    "ReplayBuffer",
    "RolloutCollector",
    "RunningMeanStd",
    "clipped_surrogate_loss",
    "env_spaces",
    "evaluate",
    "gae",
    "get_env_state",
    "make_env",
    "make_vector_env",
    "require_gymnasium",
    "set_env_state",
    "value_loss",
]
