"""SAC and SAC+ERA on gymnasium environments as a LightningModule (manual optimisation)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from entreg.distributions import HALF_LOG_2PI_E
from entreg.loggers import log_metrics
from entreg.modules.epoch_steps import epoch_steps_loader
from entreg.nn.era import GaussianERA
from entreg.nn.optim import OptimizerFactory, optimizer_or_default
from entreg.rl.buffer import ReplayBuffer
from entreg.rl.envs import POLICY_TAGS, Evaluation, evaluate, get_env_state, make_env, set_env_state
from entreg.rl.policies import Squash
from entreg.rl.sac import SAC, TemperatureEntropy

__all__ = ["SACModule"]

# the update statistics behind the policy tags both RL agents log (entreg.rl.envs.POLICY_TAGS)
POLICY_STATS = dict(zip(POLICY_TAGS, ("std", "policy_entropy", "gaussian_entropy"), strict=True))


class SACModule(L.LightningModule):
    """Soft actor-critic (Haarnoja et al. 2018, arXiv 1801.01290 and 1812.05905) with automatic temperature, or
    SAC+ERA (Kang et al. 2025, arXiv 2510.08549), on a gymnasium env with a Box action space.

    The algorithm is :class:`entreg.rl.sac.SAC` (its docstring gives the update and what SAC+ERA follows). One
    training step is one env step; before ``learning_starts`` steps the actions are uniform in the action
    space, after it they are sampled from the policy, and once more than ``learning_starts`` steps are stored,
    every ``train_freq`` steps make ``gradient_steps`` updates on minibatches of ``batch_size`` from the replay
    buffer (:class:`entreg.rl.buffer.ReplayBuffer`). Defaults are Stable-Baselines3's SAC: Adam(lr 3e-4) for
    actor, critics and log alpha, buffer 1e6, batch 256, tau 0.005, gamma 0.99, learning_starts 100, one update
    per step, 256-256 ReLU networks, alpha learned from 1.0 towards the target entropy -dim(A). Actions are
    rescaled from [-1, 1] to the env's bounds. Episodes ended by the time limit are not terminal (the critic
    target bootstraps from the final observation).

    SAC+ERA (``era_entropy_per_dim`` set): the actor's std comes from :class:`entreg.nn.GaussianERA`, the Gaussian's
    entropy is ``era_entropy_per_dim * dim(A)`` in every state (higher only where a log-std is clamped at -8; ERA's
    training script: 0.25 per dimension, log-std in [-8, 0]), actions are drawn from the Gaussian centred at
    tanh(mean) truncated to [-1, 1] and no entropy term enters the losses, as in ERA's released SAC
    (``squash="tanh"``: the paper's tanh squashing). With a one-dimensional action (InvertedPendulum) ERA has
    nothing to distribute and the std is the constant exp(H0 - 0.5 ln(2 pi e)).

    Control arm for ERA's initial noise (``init_entropy_per_dim``; ``model=sac_authors_matched_std``): ERA's actor
    starts with the Gaussian's entropy at ``era_entropy_per_dim * dim(A)`` (cheetah-run at 0.25 nats: mean std 0.34),
    the plain head higher (mean std 0.85, 1.2 nats per dimension); ``init_entropy_per_dim`` starts plain SAC's
    log-std at ``init_entropy_per_dim - 0.5 ln(2 pi e)`` in every state (the head's log-std weights zero, its biases
    that value, both learned), so the two start with the same entropy and differ in the floor (and the temperature).
    Its temperature learns to hold -dim(A) nats, far below ERA's level (on cheetah-run its std is the plain agent's
    within the first 1e4 updates). The second control (``target_entropy_per_dim``; ``model=sac_authors_matched_target``)
    also moves the temperature's target to ERA's nats per dimension: the same start and the same level, held on average
    over the states by SAC's dual ascent and the alpha log pi terms instead of in every state by ERA's activation. The
    rule holds the acting policy's -mean log pi, which truncation lowers below the Gaussian's entropy (its variance is
    smaller), so at the same nats the control's Gaussian is at least as wide as ERA's (cheetah-run: std 0.65-0.69
    against ERA's 0.36-0.40). The third control (``temperature_entropy="gaussian"``;
    ``model=sac_authors_matched_gaussian``) holds the Gaussian's entropy instead, the quantity ERA sets, so its noise
    is ERA's on average over states and it differs from ERA in the floor per state and the alpha log pi terms.

    Non-finite data: a transition whose reward or next observation is NaN or infinite is not stored (counted
    in ``train/skipped_transitions``, with a warning); a non-finite next observation also ends the episode (the
    env is reset), so the policy never acts on it. The weights therefore only ever see finite data.

    Logged to the trainer's loggers with the env step as x-axis (at periods of their own, so independent of
    ``log_every_n_steps``): ``rollout/episode_return`` and ``rollout/episode_length`` at each episode end;
    every ``log_every`` env steps the means since the last log of ``train/critic_loss``, ``train/actor_loss``,
    ``train/q``, ``train/policy_entropy`` (-log pi of the sampled actions: the entropy the temperature
    controls), ``train/gaussian_entropy`` (before squashing: ERA's constrained quantity), ``train/std``,
    ``train/alpha``, ``train/target_entropy``, ``train/era_delta`` (ERA), ``train/skipped_transitions``,
    ``perf/updates_per_s`` and ``perf/steps_per_s`` (training wall time, evaluation excluded), and the policy tags
    that PPOModule logs too: ``policy/std`` (the Gaussian's mean std over the minibatches' states and dimensions),
    ``policy/entropy`` (= ``train/policy_entropy``, the acting policy's) and ``policy/gaussian_entropy``;
    ``eval/return`` every ``eval_every`` env steps and at the end: the mean return of ``eval_episodes``
    deterministic episodes (the action tanh(mean)) seeded ``eval_seed, eval_seed + 1, ...``, whose record
    (:class:`entreg.rl.envs.Evaluation`) is ``last_evaluation`` (:class:`entreg.callbacks.LearningCurve` collects
    them). The latest values are also in ``trainer.callback_metrics``.

    Checkpoints hold the weights (actor, critics, target critics, log alpha), the optimizers, the counters, the
    noise generator, the replay buffer (``save_buffer``) and, for MuJoCo envs, the env's exact simulator state,
    RNG and time-limit counter with the current observation, so resuming from a checkpoint continues exactly
    like the uninterrupted run. Other envs cannot be restored: they are reset on resume (with a warning).

    Args:
        env_id: gymnasium id, e.g. ``"Hopper-v5"``; ``env_kwargs`` go to ``gymnasium.make``.
        total_steps: env steps of the run (the fit stops there); use ``max_epochs=-1`` or enough epochs.
        buffer_size, batch_size, learning_starts, train_freq, gradient_steps: replay and update schedule.
        gamma, tau: discount and Polyak coefficient.
        ent_coef, initial_alpha, target_entropy: temperature, ``"auto"`` (dual ascent from ``initial_alpha``
            towards ``target_entropy``, default -dim(A)) or a fixed value.
        target_entropy_per_dim: the temperature's target in nats per action dimension instead (``target_entropy``
            = this times dim(A); ERA's second control arm). Either target needs the learned temperature.
        temperature_entropy: what the temperature holds at its target: ``"policy"`` (-mean log pi of the acting
            policy, SAC) or ``"gaussian"`` (the Gaussian's entropy before squashing, as ERA; its third control arm).
        hidden, activation, log_std_min, log_std_max: actor and critic MLPs, the actor's log-std clamp.
        init_entropy_per_dim: plain SAC only: the Gaussian's initial entropy in nats per action dimension in every
            state (ERA's control arm; None: the head's initialisation).
        era_entropy_per_dim, era_log_std_min, era_log_std_max: SAC+ERA (None: plain SAC).
        era_delta, era_learn_delta, era_delta_lr: the paper's compensation delta (:class:`entreg.nn.GaussianERA`):
            a constant (0: off, as ERA's released code), or learned from that initial value by projected descent on
            L(delta) = delta (H_hat - H0) with the batch's -mean log pi of the bounded policy; logged as
            ``train/era_delta``.
        squash: ``"tanh"`` or ``"truncated"`` (None: tanh for SAC, truncated for ERA).
        entropy_in_losses: alpha log pi terms in the losses (None: SAC yes, ERA no).
        ortho_init, critic_layer_norm, critic_loss_weight, action_bound: ERA's released agent
            (:class:`entreg.rl.sac.SAC`; ``model=sac_era_authors``).
        optimizer: factory ``params -> Optimizer`` for the actor, and for the critics (with log alpha) unless
            ``critic_optimizer`` is given; default Adam(lr=3e-4, foreach=True).
        critic_optimizer: factory for the critics (and log alpha, without weight decay) (ERA's code: AdamW with weight
            decay 1e-4); None: ``optimizer``.
        steps_per_epoch: env steps per Lightning epoch (checkpoints are written at epoch ends).
        eval_every, eval_episodes, eval_seed: evaluation period in env steps (0: only at the end), episodes
            and their first seed.
        log_every: period in env steps of the ``train/`` and ``perf/`` metrics.
        save_buffer: keep the replay buffer in checkpoints (needed for an exact resume; large for long runs).
        seed: seed of the initial weights, the env and the noise (a run is reproducible from it).

    Example:
        >>> module = SACModule("InvertedPendulum-v5", total_steps=60, learning_starts=40, batch_size=16,
        ...                    hidden=(16, 16), steps_per_epoch=30, eval_episodes=1)
        >>> trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module)
        >>> module.env_steps, module.updates, "eval/return" in trainer.callback_metrics
        (60, 20, True)
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        total_steps: int = 1_000_000,
        buffer_size: int = 1_000_000,
        batch_size: int = 256,
        learning_starts: int = 100,
        train_freq: int = 1,
        gradient_steps: int = 1,
        gamma: float = 0.99,
        tau: float = 0.005,
        ent_coef: str | float = "auto",
        initial_alpha: float = 1.0,
        target_entropy: float | None = None,
        target_entropy_per_dim: float | None = None,
        temperature_entropy: TemperatureEntropy = "policy",
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "relu",
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
        init_entropy_per_dim: float | None = None,
        era_entropy_per_dim: float | None = None,
        era_log_std_min: float = -8.0,
        era_log_std_max: float = 0.0,
        era_delta: float = 0.0,
        era_learn_delta: bool = False,
        era_delta_lr: float = 1e-3,
        squash: Squash | None = None,
        entropy_in_losses: bool | None = None,
        ortho_init: bool = False,
        critic_layer_norm: bool = False,
        critic_loss_weight: float = 0.5,
        action_bound: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        critic_optimizer: OptimizerFactory | None = None,
        steps_per_epoch: int = 1000,
        eval_every: int = 10_000,
        eval_episodes: int = 10,
        eval_seed: int = 10_000,
        log_every: int = 1000,
        save_buffer: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in {
            "total_steps": total_steps,
            "buffer_size": buffer_size,
            "batch_size": batch_size,
            "train_freq": train_freq,
            "gradient_steps": gradient_steps,
            "steps_per_epoch": steps_per_epoch,
            "eval_episodes": eval_episodes,
            "log_every": log_every,
        }.items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if learning_starts < 0 or eval_every < 0:
            raise ValueError(f"learning_starts and eval_every must be >= 0, got {learning_starts}, {eval_every}")
        self.save_hyperparameters(ignore=["optimizer", "critic_optimizer"])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.critic_optimizer_factory = critic_optimizer
        from gymnasium.spaces import Box

        env = make_env(env_id, **(env_kwargs or {}))
        obs_space, action_space = env.observation_space, env.action_space
        env.close()
        if not isinstance(action_space, Box) or not np.all(np.isfinite(action_space.low + action_space.high)):
            raise ValueError(f"SAC needs a bounded Box action space, {env_id} has {action_space}")
        self.obs_dim, self.action_dim = int(np.prod(obs_space.shape)), int(np.prod(action_space.shape))
        self.action_low = action_space.low.reshape(-1).astype(np.float64)
        self.action_high = action_space.high.reshape(-1).astype(np.float64)
        era = None
        if era_entropy_per_dim is not None:
            era = GaussianERA.per_dimension(
                self.action_dim,
                era_entropy_per_dim,
                era_log_std_min,
                era_log_std_max,
                delta=era_delta,
                learn_delta=era_learn_delta,
                delta_lr=era_delta_lr,
            )
        elif era_delta or era_learn_delta:
            raise ValueError("era_delta and era_learn_delta compensate ERA's target: set era_entropy_per_dim too")
        if init_entropy_per_dim is not None and era is not None:
            raise ValueError("init_entropy_per_dim sets plain SAC's initial std: ERA sets its own (era_*)")
        log_std_init = None if init_entropy_per_dim is None else init_entropy_per_dim - HALF_LOG_2PI_E
        if target_entropy is not None and target_entropy_per_dim is not None:
            raise ValueError(
                f"give the temperature's target once: target_entropy={target_entropy} (nats) or "
                f"target_entropy_per_dim={target_entropy_per_dim} (nats per action dimension)"
            )
        if target_entropy_per_dim is not None:
            target_entropy = target_entropy_per_dim * self.action_dim
        with torch.random.fork_rng(devices=[]):  # the initial weights follow `seed`, not the global RNG
            torch.manual_seed(seed)
            self.sac = SAC(
                self.obs_dim,
                self.action_dim,
                tuple(hidden),
                activation,
                gamma=gamma,
                tau=tau,
                ent_coef=ent_coef,
                initial_alpha=initial_alpha,
                target_entropy=target_entropy,
                temperature_entropy=temperature_entropy,
                log_std_min=log_std_min,
                log_std_max=log_std_max,
                era=era,
                squash=squash,
                entropy_in_losses=entropy_in_losses,
                ortho_init=ortho_init,
                critic_layer_norm=critic_layer_norm,
                critic_loss_weight=critic_loss_weight,
                action_bound=action_bound,
                log_std_init=log_std_init,
            )
        self.env_steps = 0
        self.updates = 0
        self.episodes = 0
        self.skipped_transitions = 0
        self.eval_seconds = 0.0  # wall time spent in the periodic evaluations
        self.last_evaluation: Evaluation | None = None  # the latest evaluation (for entreg.callbacks.LearningCurve)
        self.env: Any = None
        self.buffer: ReplayBuffer | None = None
        self.generator: torch.Generator | None = None
        self._obs: np.ndarray | None = None
        self._episode_return = 0.0
        self._episode_length = 0
        self._resume: dict[str, Any] | None = None
        self._window: dict[str, Any]
        self._new_window()

    @property
    def training_progress(self) -> tuple[int, int, str]:
        """(env steps done, of the total, "env steps"): what entreg's progress bar shows."""
        return self.env_steps, self.hparams.total_steps, "env steps"

    # ----------------------------------------------------------------------------------------------- setup
    def train_dataloader(self) -> DataLoader:
        return epoch_steps_loader(self, self.hparams.steps_per_epoch, lambda: self.env_steps)  # an item per env step

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        factory = optimizer_or_default(self.optimizer_factory, torch.optim.Adam, lr=3e-4, foreach=True)
        return list(self.sac.optimizers(self.critic_optimizer_factory or factory, factory))

    def on_train_start(self) -> None:
        h = self.hparams
        if self.trainer.world_size > 1:
            raise RuntimeError("SACModule runs on one device (one env, one replay buffer): use devices=1")
        if self.env_steps >= h.total_steps:  # resumed from a checkpoint of a finished run: nothing left to do
            self.trainer.should_stop = True
        self.env = make_env(h.env_id, **(h.env_kwargs or {}))
        self.buffer = ReplayBuffer(h.buffer_size, self.obs_dim, self.action_dim, self.device, seed=h.seed)
        self.generator = torch.Generator(device=self.device)
        self._new_window()
        state, self._resume = self._resume, None
        if state is None:
            self.generator.manual_seed(h.seed)
            self._reset_env(seed=h.seed)
            return
        self.generator.set_state(state["generator"])
        if state.get("window") is not None:  # checkpoints from before the window was saved have none
            self._window = state["window"] | {"stats": [dict(stats) for stats in state["window"]["stats"]]}
        if state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        else:
            rank_zero_warn("SAC resume: the checkpoint has no replay buffer (save_buffer=False): it starts empty")
        if state["env"] is not None:
            set_env_state(self.env, state["env"])
            self._obs = state["obs"].numpy().copy()
            self._episode_return, self._episode_length = state["episode_return"], state["episode_length"]
        else:
            rank_zero_warn("SAC resume: the env's state is not restorable (not MuJoCo): env reset, episode lost")
            self._reset_env(seed=h.seed + self.env_steps)

    def on_train_end(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def _reset_env(self, seed: int | None = None) -> None:
        self._obs, _ = self.env.reset(seed=seed)
        self._episode_return, self._episode_length = 0.0, 0

    def _new_window(self) -> None:
        self._window = {"stats": [], "updates": 0, "steps": 0, "time": 0.0}

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> None:
        h = self.hparams
        start = time.perf_counter()
        action = self._action()
        obs, reward, terminated, truncated, _ = self.env.step(self._scale(action))
        self.env_steps += 1
        self._episode_length += 1
        obs_ok = bool(np.isfinite(obs).all())
        if np.isfinite(reward):
            self._episode_return += float(reward)
        if not (obs_ok and self.buffer.add(self._obs, action, reward, obs, terminated)):
            self.skipped_transitions += 1
            warnings.warn(
                "SAC: a transition with a non-finite reward or observation was not stored "
                "(counted in train/skipped_transitions)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._obs = obs
        metrics: dict[str, float] = {}
        if terminated or truncated or not obs_ok:
            self.episodes += 1
            metrics["rollout/episode_return"] = self._episode_return
            metrics["rollout/episode_length"] = float(self._episode_length)
            self._reset_env()
        if self.env_steps > h.learning_starts and self.env_steps % h.train_freq == 0 and len(self.buffer) > 0:
            critic_opt, actor_opt = self.optimizers()
            for _ in range(h.gradient_steps):
                stats = self.sac.update(
                    self.buffer.sample(h.batch_size), critic_opt, actor_opt, self.generator, self.manual_backward
                )
                self._window["stats"].append(stats)
            self.updates += h.gradient_steps
            self._window["updates"] += h.gradient_steps
        self._window["steps"] += 1
        self._window["time"] += time.perf_counter() - start
        done = self.env_steps >= h.total_steps
        if self.env_steps % h.log_every == 0 or done:
            metrics |= self._window_metrics()
        if done or (h.eval_every and self.env_steps % h.eval_every == 0):
            eval_start = time.perf_counter()
            self.last_evaluation = self.evaluate()
            metrics["eval/return"] = self.last_evaluation.mean_return
            self.eval_seconds += time.perf_counter() - eval_start
        if metrics:
            self._emit(metrics)
        if done:
            self.trainer.should_stop = True

    @torch.no_grad()
    def _action(self) -> np.ndarray:
        """The action in [-1, 1] for the current observation: uniform before ``learning_starts``, else sampled."""
        if self.env_steps < self.hparams.learning_starts:
            uniform = torch.rand(self.action_dim, generator=self.generator, device=self.device)
            return (uniform * 2.0 - 1.0).cpu().numpy()
        obs = torch.as_tensor(np.nan_to_num(self._obs), dtype=torch.float32).reshape(1, -1).to(self.device)
        return self.sac.act(obs, generator=self.generator)[0].cpu().numpy()

    def _scale(self, action: np.ndarray | Tensor) -> np.ndarray:
        """[-1, 1] -> the env's bounds."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        return self.action_low + (a + 1.0) * 0.5 * (self.action_high - self.action_low)

    def _window_metrics(self) -> dict[str, float]:
        w = self._window
        metrics = {
            "train/skipped_transitions": float(self.skipped_transitions),
            "train/target_entropy": float(
                self.sac.era.target_entropy if self.sac.era is not None else self.sac.target_entropy
            ),
            "perf/steps_per_s": w["steps"] / max(w["time"], 1e-9),
        }
        if w["stats"]:
            means = torch.stack([torch.stack(list(s.values())) for s in w["stats"]]).mean(0).tolist()
            metrics |= {f"train/{k}": v for k, v in zip(w["stats"][0], means, strict=True)}
            metrics |= {tag: metrics[f"train/{key}"] for tag, key in POLICY_STATS.items()}
            metrics["perf/updates_per_s"] = w["updates"] / max(w["time"], 1e-9)
        self._new_window()
        return metrics

    def _emit(self, metrics: dict[str, float]) -> None:
        """Write ``metrics`` to the loggers at the current env step and to ``trainer.callback_metrics``."""
        log_metrics(self.trainer, metrics, step=self.env_steps)
        self.log_dict(metrics, logger=False, on_step=True, on_epoch=False)

    # ----------------------------------------------------------------------------------------------- acting
    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) in the env's units for raw observation(s) of shape (obs_dim,) or (B, obs_dim);
        deterministic: tanh(mean). Non-finite observation entries are read as 0."""
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(-1, self.obs_dim)
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a non-finite observation must not give NaN actions
        a = self.sac.act(x, deterministic=deterministic, generator=self.generator).cpu().numpy()
        scaled = self.action_low + (a.astype(np.float64) + 1.0) * 0.5 * (self.action_high - self.action_low)
        return scaled.reshape((*np.shape(obs)[:-1], self.action_dim))

    def evaluate(self, episodes: int | None = None, seed: int | None = None) -> Evaluation:
        """Deterministic episodes seeded ``eval_seed + k`` (defaults from the hyperparameters), as an
        :class:`entreg.rl.envs.Evaluation` at the current env step."""
        h = self.hparams
        seed = h.eval_seed if seed is None else seed
        actor = self.sac.actor
        was_training = actor.training
        actor.eval()

        def act(obs: Tensor) -> Tensor:
            return torch.from_numpy(self.act(obs.to(self.device), deterministic=True))

        try:
            returns = evaluate(act, h.env_id, episodes or h.eval_episodes, seed, **(h.env_kwargs or {}))
            return Evaluation(self.env_steps, seed, tuple(returns))
        finally:
            actor.train(was_training)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        env_state = get_env_state(self.env) if self.env is not None else None
        checkpoint["sac"] = {
            "env_steps": self.env_steps,
            "updates": self.updates,
            "episodes": self.episodes,
            "skipped_transitions": self.skipped_transitions,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "buffer": self.buffer.state_dict() if self.buffer is not None and self.hparams.save_buffer else None,
            "env": env_state,
            "obs": torch.from_numpy(np.asarray(self._obs)).clone() if env_state is not None else None,
            "episode_return": self._episode_return,
            "episode_length": self._episode_length,
            # the logging window so far, so that a resumed run logs the same means
            "window": self._window | {"stats": [dict(stats) for stats in self._window["stats"]]},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sac")
        if state is None:
            return
        self.env_steps, self.updates = state["env_steps"], state["updates"]
        self.episodes, self.skipped_transitions = state["episodes"], state["skipped_transitions"]
        self._resume = state if state["generator"] is not None else None
