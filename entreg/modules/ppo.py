"""PPO and PPO+ERA on gymnasium environments as a LightningModule (manual optimisation)."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from entreg.distributions import HALF_LOG_2PI_E, gaussian_log_prob
from entreg.modules.epoch_steps import epoch_steps_loader
from entreg.nn.era import GaussianERA
from entreg.nn.optim import OptimizerFactory, optimizer_or_default
from entreg.policy_gradient import clipped_surrogate_loss, masked_mean, value_loss
from entreg.rl.envs import POLICY_TAGS, Evaluation, env_spaces, make_vector_env
from entreg.rl.envs import evaluate as run_episodes
from entreg.rl.gae import gae
from entreg.rl.normalization import RunningMeanStd
from entreg.rl.ppo import GaussianActorCritic, Rollout, RolloutCollector, normalize_advantages

__all__ = ["PPOModule"]


class PPOModule(L.LightningModule):
    """Proximal policy optimisation (Schulman et al. 2017, arXiv 1707.06347) of a Gaussian policy on a gymnasium
    env, optionally with ERA (Kang et al. 2025, arXiv 2510.08549): a per-state entropy floor instead of a bonus.

    One training step is one rollout of ``n_steps`` steps in each of ``num_envs`` envs
    (:func:`entreg.rl.envs.make_vector_env`; with gymnasium's next-step autoreset the step after an episode's end
    is the reset and is masked out), GAE (:func:`entreg.rl.gae.gae`; truncated episodes bootstrap from the value
    of their final observation), then ``n_epochs`` passes over the rollout in minibatches of ``batch_size`` with
    the clipped objective, the value loss, the entropy bonus, advantages normalised per minibatch and the gradient
    norm clipped; optionally an early stop of the epochs when the approximate KL exceeds 1.5 ``target_kl`` (as
    SB3). Defaults are SB3's PPO
    with RL-Zoo's ``normalize: true`` for MuJoCo (observations normalised and clipped to 10, rewards scaled by
    the std of the discounted return and clipped to 10), Adam(lr 3e-4, eps 1e-5).

    PPO+ERA (``era_entropy_per_dim`` set): the actor outputs a mean and log-std scores per state and
    :class:`entreg.nn.GaussianERA` makes the policy entropy exactly ``era_entropy_per_dim * action_dim`` in every
    state (more only where a log-std reaches ``era_log_std_min``); the entropy bonus must be 0. What we follow:
    the paper's continuous ERA map (a softmax splits a fixed log-std budget over the action dimensions, log-stds
    clamped to [-8, 0] as its released SAC code) with the loss unchanged. Where we differ or had to choose: the
    released code has no PPO, so its PPO setup (target, network, schedule) is unknown to us and everything but
    the std head is plain PPO's; the target is constant (the paper's compensation delta, constant or learned, is
    not implemented); the Gaussian is not truncated (as SB3's PPO, the sample is clipped to the bounds only when
    stepping, so the entropy floor holds for the distribution PPO trains on); with one action dimension (e.g.
    InvertedPendulum) ERA is a constant std, exp(target - 0.5 ln(2 pi e)). The paper's compensation delta is not
    offered: this Gaussian is not bounded (it is clipped only at the env), so there is no bounding bias to compensate.

    Control arm for ERA's initial noise (``init_entropy_per_dim``; ``model=ppo_matched_std``): a softmax-initialised
    ERA head starts with every log-std at ``era_entropy_per_dim - 0.5 ln(2 pi e)`` (std 0.40 at 0.5 nats), plain PPO at
    ``log_std_init`` (std 1); ``init_entropy_per_dim`` sets plain PPO's state-independent log-std to the same start,
    so the two differ only in the entropy floor.

    Steps with a non-finite observation or reward are masked out of the update with a warning (see
    :class:`entreg.rl.ppo.RolloutCollector`), and an update whose gradient is not finite is skipped, so weights
    stay finite. Logged every rollout (TensorBoard x-axis: env steps over all ranks): ``rollout/episode_return``
    and ``rollout/episode_length`` (episodes that ended in the rollout, all ranks), ``train/policy_entropy``,
    ``train/approx_kl``, ``train/clip_fraction``, ``train/policy_loss``, ``train/value_loss``, ``train/std``,
    ``train/explained_variance``, ``train/masked_steps``, ``perf/steps_per_s``, ``perf/updates_per_s``, and the
    policy tags that SACModule logs too: ``policy/std`` (mean std over the rollout's states and dimensions),
    ``policy/entropy`` and ``policy/gaussian_entropy`` (both the Gaussian's: PPO acts with it); after the rollout
    that reaches each multiple of ``eval_every`` env steps and at the end, ``eval/return``: deterministic actions
    (the mean), episodes seeded ``eval_seed, eval_seed + 1, ...``, recorded as ``last_evaluation``
    (:class:`entreg.rl.envs.Evaluation`). Under DDP the episode and NaN counts and the evaluation cover all ranks,
    the other ``train/`` and ``perf/`` values are rank 0's.

    DDP: every rank steps its own ``num_envs`` envs (seeds ``seed + rank * num_envs + i``), gradients are averaged
    by DDP at every minibatch, the normalisers merge every rank's statistics after each rollout, the KL early
    stop uses the mean over ranks, so the weights stay identical on all ranks; ``n_steps`` and ``batch_size``
    are per rank.

    Checkpoints hold the weights, optimizer, normalisers, counters, every rank's noise generator and, for MuJoCo
    envs, every env's exact simulator state, RNG and time-limit counter, so a resumed run continues exactly as
    the uninterrupted run (with the same number of ranks; with another, the envs and noise are reseeded, with a
    warning, and the epochs still end at the same env steps). Other envs are reset on resume (a warning says so).

    Args:
        env_id: gymnasium id, e.g. ``"Hopper-v5"``; ``env_kwargs`` go to ``gymnasium.make``
            (:func:`entreg.rl.envs.make_env`).
        num_envs, n_steps, batch_size, n_epochs: rollout size per rank and minibatch epochs.
        gamma, gae_lambda: discount and GAE lambda.
        clip_range, clip_range_vf: ratio clip and optional value clip (None: unclipped value loss).
        ent_coef, vf_coef: weights of the entropy bonus and of the value loss.
        max_grad_norm: gradient-norm clip (None: none).
        target_kl: early-stop threshold (None: all epochs).
        normalize_advantage: per-minibatch advantage normalisation.
        normalize_obs, normalize_reward, clip_obs, clip_reward: ``VecNormalize``-style normalisation.
        hidden, activation, log_std_init, ortho_init: the networks (:class:`entreg.rl.ppo.GaussianActorCritic`).
        init_entropy_per_dim: plain PPO only: start the log-std at ``init_entropy_per_dim - 0.5 ln(2 pi e)`` instead
            of ``log_std_init`` (the policy's initial entropy in nats per action dimension: ERA's control arm).
        era_entropy_per_dim, era_log_std_min, era_log_std_max: PPO+ERA (None: plain PPO).
        optimizer: factory ``params -> Optimizer``; default Adam(lr=3e-4, eps=1e-5).
        total_steps: stop after this many env steps over all ranks (None: the trainer's limits decide).
        steps_per_epoch: epoch length in env steps over all ranks: a Lightning epoch (checkpoints are written at
            epoch ends) ends after the rollout that reaches each multiple, also when a resume changes the number of
            ranks (None: one rollout).
        eval_every, eval_episodes, eval_seed: evaluation period in env steps (0: only at the end of
            ``total_steps``), episodes and their first seed.
        seed: seed of the initial weights, the envs and the action noise (a run is reproducible from it).
        total_timesteps, rollouts_per_epoch: deprecated names of ``total_steps`` and (in rollouts) of
            ``steps_per_epoch``, as SACModule counts (None: unused).

    Example:
        >>> module = PPOModule("InvertedPendulum-v5", n_steps=64, batch_size=32, n_epochs=2, eval_every=128)
        >>> trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(module)
        >>> module.env_steps, "eval/return" in trainer.callback_metrics
        (128, True)
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 1,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float = 0.2,
        clip_range_vf: float | None = None,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float | None = 0.5,
        target_kl: float | None = None,
        normalize_advantage: bool = True,
        normalize_obs: bool = True,
        normalize_reward: bool = True,
        clip_obs: float = 10.0,
        clip_reward: float = 10.0,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        log_std_init: float = 0.0,
        init_entropy_per_dim: float | None = None,
        ortho_init: bool = True,
        era_entropy_per_dim: float | None = None,
        era_log_std_min: float = -8.0,
        era_log_std_max: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        eval_every: int = 20480,
        eval_episodes: int = 5,
        eval_seed: int = 10_000,
        seed: int = 0,
        total_timesteps: int | None = None,
        rollouts_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if total_timesteps is not None:  # the old name, given explicitly, wins over the new name's default
            warnings.warn("PPOModule: total_timesteps is deprecated, use total_steps", DeprecationWarning, stacklevel=2)
            total_steps = total_timesteps
        _check_positive(num_envs=num_envs, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs)
        _check_positive(eval_episodes=eval_episodes, clip_range=clip_range)
        if rollouts_per_epoch is not None:
            if steps_per_epoch is not None:
                raise ValueError("give steps_per_epoch (env steps) or its deprecated form rollouts_per_epoch, not both")
            warnings.warn(
                "PPOModule: rollouts_per_epoch is deprecated, use steps_per_epoch (env steps)",
                DeprecationWarning,
                stacklevel=2,
            )
        for name, value in {"steps_per_epoch": steps_per_epoch, "rollouts_per_epoch": rollouts_per_epoch}.items():
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        if init_entropy_per_dim is not None:
            if era_entropy_per_dim is not None:
                raise ValueError("init_entropy_per_dim sets plain PPO's initial std: ERA sets its own (era_*)")
            log_std_init = init_entropy_per_dim - HALF_LOG_2PI_E
        if batch_size > n_steps * num_envs:
            raise ValueError(f"batch_size ({batch_size}) must be <= n_steps * num_envs ({n_steps * num_envs})")
        if not (0.0 <= gamma <= 1.0 and 0.0 <= gae_lambda <= 1.0):
            raise ValueError(f"gamma and gae_lambda must be in [0, 1], got {gamma}, {gae_lambda}")
        for name, value in {
            "clip_range_vf": clip_range_vf,
            "max_grad_norm": max_grad_norm,
            "target_kl": target_kl,
        }.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if ent_coef < 0 or vf_coef < 0 or eval_every < 0:
            raise ValueError(f"ent_coef, vf_coef and eval_every must be >= 0, got {ent_coef}, {vf_coef}, {eval_every}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        if era_entropy_per_dim is not None and ent_coef != 0:
            raise ValueError(
                f"ERA fixes the policy entropy, so the entropy bonus must be off: ent_coef=0, got {ent_coef}"
            )
        self.save_hyperparameters(ignore=["optimizer", "total_timesteps"])
        self.hparams.total_steps = total_steps
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        obs_space, action_space = env_spaces(env_id, **(env_kwargs or {}))
        obs_dim, action_dim = int(np.prod(obs_space.shape)), int(np.prod(action_space.shape))
        era = None
        if era_entropy_per_dim is not None:
            era = GaussianERA.per_dimension(action_dim, era_entropy_per_dim, era_log_std_min, era_log_std_max)
        with torch.random.fork_rng(devices=[]):  # the initial weights follow `seed`, not the global RNG
            torch.manual_seed(seed)
            self.policy = GaussianActorCritic(
                obs_dim, action_dim, tuple(hidden), activation, log_std_init, ortho_init, era
            )
        self.obs_rms = RunningMeanStd((obs_dim,), clip=clip_obs) if normalize_obs else None
        self.return_rms = RunningMeanStd((), clip=clip_reward) if normalize_reward else None
        self.rollouts = 0
        self.env_steps = 0
        self.updates = 0  # optimizer steps
        self.skipped_updates = 0
        self.eval_seconds = 0.0  # wall time spent in evaluations
        self.last_evaluation: Evaluation | None = None  # the latest evaluation (for entreg.callbacks.LearningCurve)
        self.collector: RolloutCollector | None = None
        self.generator = torch.Generator()
        self._resume: dict[str, Any] | None = None

    @property
    def training_progress(self) -> tuple[int, int | None, str]:
        """(env steps done over all ranks, of ``total_steps``, "env steps"): what entreg's progress bar shows."""
        return self.env_steps, self.hparams.total_steps, "env steps"

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.collector is not None:
            return
        h = self.hparams
        envs = make_vector_env(h.env_id, h.num_envs, self._env_seed(), **(h.env_kwargs or {}))
        self.collector = RolloutCollector(envs, self.obs_rms, self.return_rms, h.gamma)

    def _env_seed(self) -> int:
        return self.hparams.seed + self.global_rank * self.hparams.num_envs

    def on_train_start(self) -> None:
        if self.hparams.total_steps is not None and self.env_steps >= self.hparams.total_steps:
            self.trainer.should_stop = True  # resumed from a checkpoint of a finished run: nothing left to do
        state, self._resume = self._resume, None
        ranks = state["ranks"] if state is not None else None
        if ranks is not None and len(ranks) == self.trainer.world_size:
            mine = ranks[self.global_rank]
            self.generator.set_state(mine["generator"])
            if self.collector.load_state_dict(mine["collector"], seed=self._env_seed() + self.env_steps):
                return
            rank_zero_warn("PPO resume: the envs' states are not restorable (not MuJoCo): envs reset, episodes lost")
            return
        if state is not None:
            rank_zero_warn(
                f"PPO resume: the checkpoint holds no env and noise state for {self.trainer.world_size} rank(s) (saved "
                "outside fit, or by another number of ranks): envs and action noise reseeded"
            )
        seed = self.hparams.seed + self.env_steps  # a fresh start draws new episodes after a resume
        self.generator.manual_seed(int(np.random.SeedSequence([seed, self.global_rank]).generate_state(1)[0]))
        self.collector.reset(self._env_seed() + self.env_steps)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.collector is not None:
            self.collector.envs.close()
            self.collector = None

    def train_dataloader(self) -> DataLoader:
        """An item per rollout: epochs of ``steps_per_epoch`` env steps, else of one rollout (or the deprecated
        ``rollouts_per_epoch``)."""
        h = self.hparams
        if h.steps_per_epoch is None:
            return epoch_steps_loader(self, h.rollouts_per_epoch or 1, lambda: self.rollouts)
        return epoch_steps_loader(self, h.steps_per_epoch, lambda: self.env_steps, self._rollout_steps)

    def _rollout_steps(self) -> int:
        """Env steps of one rollout over all ranks."""
        return self.hparams.n_steps * self.hparams.num_envs * self.trainer.world_size

    def configure_optimizers(self) -> torch.optim.Optimizer:
        factory = optimizer_or_default(self.optimizer_factory, torch.optim.Adam, lr=3e-4, eps=1e-5, foreach=True)
        return factory(self.policy.parameters())

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> None:
        h = self.hparams
        start = time.perf_counter()
        self.policy.eval()
        rollout = self.collector.collect(self.policy, h.n_steps, self.generator)
        self._merge_normalizer_stats(rollout)
        data = self._training_batch(rollout)
        self.policy.train()
        update_start = time.perf_counter()
        stats = self._update(data)
        now = time.perf_counter()
        steps = self._rollout_steps()
        self.rollouts += 1
        self.env_steps += steps
        metrics = {
            **stats,
            "train/masked_steps": self._sum(float(rollout.nonfinite_steps)),
            "perf/steps_per_s": steps / (now - start),
            "perf/updates_per_s": stats["train/updates"] / max(now - update_start, 1e-9),
        }
        metrics |= self._episode_metrics(rollout)
        done = h.total_steps is not None and self.env_steps >= h.total_steps
        crossed = h.eval_every and self.env_steps // h.eval_every > (self.env_steps - steps) // h.eval_every
        if done or crossed:
            eval_start = time.perf_counter()
            self.last_evaluation = self.evaluate()
            metrics["eval/return"] = self.last_evaluation.mean_return
            self.eval_seconds += time.perf_counter() - eval_start
        self.log("step", float(self.env_steps), on_step=True, on_epoch=False)
        self.log_dict(metrics, on_step=True, on_epoch=False)
        if done:
            self.trainer.should_stop = True

    def _merge_normalizer_stats(self, rollout: Rollout) -> None:
        """Merge every rank's statistics of this rollout into the normalisers, in rank order on every rank."""
        for rms, moments in ((self.obs_rms, rollout.obs_moments), (self.return_rms, rollout.return_moments)):
            if rms is None:
                continue
            mean, var, count = moments
            packed = torch.cat([mean.reshape(-1), var.reshape(-1), torch.tensor([count], dtype=torch.float64)])
            gathered = self._gather(packed.to(self.device))
            for row in gathered.cpu():
                k = mean.numel()
                rms.merge(row[:k].reshape(mean.shape), row[k : 2 * k].reshape(mean.shape), row[-1])

    def _gather(self, x: Tensor) -> Tensor:
        """All ranks' ``x`` stacked (rank order)."""
        if self.trainer.world_size == 1:
            return x[None]
        return self.all_gather(x)

    def _sum(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        return float(self.trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="sum"))

    @torch.no_grad()
    def _training_batch(self, rollout: Rollout) -> dict[str, Tensor]:
        h = self.hparams
        obs, next_obs = rollout.obs.to(self.device), rollout.next_obs.to(self.device)
        values, next_values = self.policy.value(obs), self.policy.value(next_obs)
        valid = rollout.valid.to(self.device)
        advantages, returns = gae(
            rollout.rewards.to(self.device),
            values,
            next_values,
            rollout.terminated.to(self.device),
            rollout.truncated.to(self.device),
            h.gamma,
            h.gae_lambda,
            valid,
        )
        data = {
            "obs": obs,
            "actions": rollout.actions.to(self.device),
            "log_probs": rollout.log_probs.to(self.device),
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "valid": valid,
        }
        return {k: v.flatten(0, 1) for k, v in data.items()}

    def _update(self, data: dict[str, Tensor]) -> dict[str, float]:
        """``n_epochs`` minibatch passes of the PPO loss over the rollout; returns the mean diagnostics."""
        h = self.hparams
        optimizer = self.optimizers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        size = data["obs"].shape[0]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0}
        updates = 0
        for _ in range(h.n_epochs):
            order = torch.randperm(size, generator=self.generator).to(self.device)
            for begin in range(0, size, h.batch_size):
                mb = {k: v[order[begin : begin + h.batch_size]] for k, v in data.items()}
                mask = mb["valid"]
                mean, log_std = self.policy.policy(mb["obs"])
                log_prob = gaussian_log_prob(mb["actions"], mean, log_std)
                advantages = normalize_advantages(mb["advantages"], mask) if h.normalize_advantage else mb["advantages"]
                policy = clipped_surrogate_loss(log_prob, mb["log_probs"], advantages, h.clip_range, mask)
                if h.target_kl is not None and self._mean(policy.approx_kl) > 1.5 * h.target_kl:
                    return self._update_stats(sums, updates, data)
                values = value_loss(self.policy.value(mb["obs"]), mb["values"], mb["returns"], h.clip_range_vf, mask)
                loss = policy.loss + h.vf_coef * values
                if h.ent_coef:
                    loss = loss - h.ent_coef * masked_mean(self.policy.entropy(log_std), mask)
                optimizer.zero_grad()
                self.manual_backward(loss)
                # after DDP's all-reduce the gradients are equal on every rank, so every rank decides alike
                norm = torch.nn.utils.clip_grad_norm_(params, h.max_grad_norm or math.inf)
                if not torch.isfinite(norm):
                    self.skipped_updates += 1
                    rank_zero_warn(f"PPO: non-finite gradient, update skipped ({self.skipped_updates} so far)")
                    optimizer.zero_grad()
                    continue
                optimizer.step()
                updates += 1
                self.updates += 1
                for key, value in (("policy_loss", policy.loss), ("value_loss", values)):
                    sums[key] += float(value.detach())
                sums["approx_kl"] += float(policy.approx_kl)
                sums["clip_fraction"] += float(policy.clip_fraction)
        return self._update_stats(sums, updates, data)

    def _mean(self, value: Tensor) -> float:
        if self.trainer.world_size == 1:
            return float(value)
        return float(self.trainer.strategy.reduce(value.detach(), reduce_op="mean"))

    @torch.no_grad()
    def _update_stats(self, sums: dict[str, float], updates: int, data: dict[str, Tensor]) -> dict[str, float]:
        _, log_std = self.policy.policy(data["obs"])
        valid = data["valid"]
        values = self.policy.value(data["obs"])
        returns = data["returns"]
        residual = masked_mean((returns - values - masked_mean(returns - values, valid)).square(), valid)
        spread = masked_mean((returns - masked_mean(returns, valid)).square(), valid)
        stats = {f"train/{k}": v / max(updates, 1) for k, v in sums.items()}
        entropy = float(masked_mean(self.policy.entropy(log_std), valid))
        std = float(masked_mean(log_std.exp().mean(-1), valid))
        stats |= {
            "train/policy_entropy": entropy,
            "train/std": std,
            "train/explained_variance": float(1 - residual / spread) if spread > 0 else float("nan"),
            "train/updates": float(updates),
            "train/skipped_updates": float(self.skipped_updates),
        }
        stats |= dict(zip(POLICY_TAGS, (std, entropy, entropy), strict=True))  # PPO acts with its Gaussian
        return stats

    def _episode_metrics(self, rollout: Rollout) -> dict[str, float]:
        """Mean return and length of the episodes that ended in this rollout on any rank (none: nothing)."""
        local = torch.tensor(
            [sum(rollout.episode_returns), sum(rollout.episode_lengths), len(rollout.episode_returns)],
            dtype=torch.float64,
        )
        total = self._gather(local.to(self.device)).sum(0).cpu()
        if total[2] == 0:
            return {}
        return {
            "rollout/episode_return": float(total[0] / total[2]),
            "rollout/episode_length": float(total[1] / total[2]),
        }

    # ----------------------------------------------------------------------------------------------- acting
    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> Tensor:
        """Action(s) for raw observation(s), normalised with the current statistics (not updated); deterministic:
        the mean. In the env's units, not clipped: clip to the action bounds before stepping."""
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        if self.obs_rms is not None:
            x = self.obs_rms.normalize(x)
        mean, log_std = self.policy.policy(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
        if deterministic:
            return mean
        return mean + log_std.exp() * torch.randn(mean.shape, generator=self.generator).to(mean)

    def evaluate(self, episodes: int | None = None, seed: int | None = None) -> Evaluation:
        """Deterministic episodes seeded ``eval_seed + k`` (defaults from the hyperparameters), split over ranks
        (:func:`entreg.rl.envs.evaluate`), as an :class:`entreg.rl.envs.Evaluation` at the current env step (every
        rank gets all the returns)."""
        h = self.hparams
        episodes, seed = episodes or h.eval_episodes, h.eval_seed if seed is None else seed
        world = self.trainer.world_size if self._trainer is not None else 1
        per_rank = math.ceil(episodes / world)
        mine = range(self.global_rank * per_rank, min((self.global_rank + 1) * per_rank, episodes))
        was_training = self.policy.training
        self.policy.eval()
        returns = [run_episodes(self.act, h.env_id, 1, seed + k, **(h.env_kwargs or {}))[0] for k in mine]
        self.policy.train(was_training)
        if world > 1:  # every rank's returns in episode order (NaN pads the ranks with fewer episodes)
            local = torch.full((per_rank,), math.nan, dtype=torch.float64)
            local[: len(returns)] = torch.tensor(returns, dtype=torch.float64)
            gathered = self._gather(local.to(self.device)).cpu().flatten()
            returns = [float(r) for r in gathered if not math.isnan(r)]
        return Evaluation(self.env_steps, seed, tuple(returns))

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ranks: list[Any] | None = None  # saved outside fit (envs closed): weights, normalisers and counters only
        if self.collector is not None:
            mine = {"generator": self.generator.get_state(), "collector": self.collector.state_dict()}
            ranks = [mine]
            if self.trainer.world_size > 1:
                ranks = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(ranks, mine)
        checkpoint["ppo"] = {
            "rollouts": self.rollouts,
            "env_steps": self.env_steps,
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            "ranks": ranks,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ppo")
        if state is None:
            return
        self.rollouts, self.env_steps = state["rollouts"], state["env_steps"]
        self.updates, self.skipped_updates = state["updates"], state["skipped_updates"]
        self._resume = state


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
