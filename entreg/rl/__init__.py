"""Reinforcement learning with entropy as a training signal: gymnasium envs, a replay buffer, SAC (+ERA), PPO (+ERA).

Needs the optional extra: ``pip install "entreg[rl]"`` (gymnasium with MuJoCo, and Stable-Baselines3 for the
parity benchmark). The Lightning modules are :class:`entreg.modules.sac.SACModule` and
:class:`entreg.modules.ppo.PPOModule`.
"""

from entreg.policy_gradient import clipped_surrogate_loss, value_loss
from entreg.rl.buffer import ReplayBatch, ReplayBuffer
from entreg.rl.envs import (
    Evaluation,
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
from entreg.rl.statistics import bootstrap_ci, difference_ci, iqm

__all__ = [
    "SAC",
    "Evaluation",
    "GaussianActor",
    "GaussianActorCritic",
    "QEnsemble",
    "ReplayBatch",
    "ReplayBuffer",
    "RolloutCollector",
    "RunningMeanStd",
    "bootstrap_ci",
    "clipped_surrogate_loss",
    "difference_ci",
    "env_spaces",
    "evaluate",
    "gae",
    "get_env_state",
    "iqm",
    "make_env",
    "make_vector_env",
    "require_gymnasium",
    "set_env_state",
    "value_loss",
]
