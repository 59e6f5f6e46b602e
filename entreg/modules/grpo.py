"""Group-relative policy optimisation of a flow model with a reward: Flow-GRPO, MixGRPO, G2RPO and E-GRPO.

:class:`GRPOIterations` is the iteration every GRPO module shares (rollouts of the variant's plans, rewards,
group statistics over the ranks, PPO-clipped steps, cost counters, evaluation); :class:`GRPOModule` fine-tunes
one of entreg's velocity networks with it, :class:`entreg.modules.grpo_pipeline.GRPOPipelineModule` the
transformer of a diffusers text-to-image pipeline.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from entreg.distributions import HALF_LOG_2PI_E
from entreg.flow.grpo import ADVANTAGE_STDS, KL_ESTIMATOR, group_advantages, kde_entropy_bonus
from entreg.flow.plans import RolloutPlan, coarsened, flow_grpo_plan, ode_plan
from entreg.flow.rollout import Rollout, Transition, ode_states, rollout, transition_log_prob_of
from entreg.flow.sampling import Velocity, time_grid
from entreg.flow.sde import gaussian_kl, get_step_type
from entreg.flow.variants import GRPOVariant, get_variant
from entreg.modules.ema import log_samples
from entreg.modules.epoch_steps import epoch_steps_loader
from entreg.nn.optim import OptimizerFactory, optimizer_or_default
from entreg.policy_gradient import clipped_surrogate_loss

__all__ = ["GRPOIterations", "GRPOModule", "check_grpo_settings", "grpo_settings"]
Reward = Callable[[Tensor, "Tensor | None"], Tensor]
COST_KEYS = ("sample_forwards", "train_forward_backwards", "reward_calls")


@dataclass
class _Collected:
    """This rank's rollouts of an iteration: training units, final samples, rewards, group ids and the
    population (class label, or 0 when unconditional) of every sample."""

    units: list[_Unit]
    samples: Tensor
    rewards: Tensor
    groups: Tensor
    populations: Tensor
    coarse_rewards: list[Tensor] = field(default_factory=list)  # per extra granularity, aligned with ``rewards``


@dataclass
class _Unit:
    """A set of stochastic transitions trained together: rows of the rollout batch, their advantages and,
    when ``shared`` > 1, the number of consecutive rows that share their state at ``branch`` (one forward)."""

    transitions: list[Transition]
    advantages: Tensor
    cond: Tensor | None
    shared: int
    branch: int  # grid index of the plan's first SDE step: the only transition whose state may be shared


def check_grpo_settings(h: Any) -> GRPOVariant:
    """Validate the settings every GRPO module shares (attributes of ``h``) and return the variant's spec."""
    spec = get_variant(h.variant)
    get_step_type(h.step_type)
    if h.steps < 2 or not 1 <= h.active_steps <= h.steps:
        raise ValueError(f"need steps >= 2 and 1 <= active_steps <= steps, got {h.steps=}, {h.active_steps=}")
    if h.group_size < 2 or h.prompts < 1 or h.minibatches < 1:
        raise ValueError(
            f"need group_size >= 2 (a group of one has no advantage), prompts >= 1, minibatches >= 1, got "
            f"{h.group_size}, {h.prompts}, {h.minibatches}"
        )
    if h.entropy_coef < 0:
        raise ValueError(f"entropy_coef must be >= 0, got {h.entropy_coef}")
    shift = getattr(h, "shift", 1.0)  # a pipeline's grid comes with its scheduler's shift
    if shift <= 0 or h.noise_level <= 0 or h.tau < 0 or h.kl_coef < 0:
        raise ValueError(
            f"need shift > 0, noise_level > 0, tau >= 0, kl_coef >= 0, got {shift}, {h.noise_level}, {h.tau}, "
            f"{h.kl_coef}"
        )
    if h.adv_std not in ADVANTAGE_STDS:
        raise ValueError(f"adv_std must be one of {ADVANTAGE_STDS}, got {h.adv_std!r}")
    granularities = list(h.granularities)
    if (
        not granularities
        or granularities[0] != 1
        or min(granularities) < 1
        or len(set(granularities)) != len(granularities)
    ):
        raise ValueError(f"granularities must be distinct integers >= 1 starting with 1, got {granularities}")
    if len(granularities) > 1 and not spec.branched:
        raise ValueError(f"granularities beyond 1 need a branched variant (g2rpo, egrpo), got {h.variant!r}")
    if h.micro_batch is not None and h.micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 or None, got {h.micro_batch}")
    if not spec.branched and h.prompts % h.minibatches:
        raise ValueError(f"prompts ({h.prompts}) must be divisible by minibatches ({h.minibatches})")
    if spec.check is not None:
        spec.check(h)
    return spec


class GRPOIterations(L.LightningModule):
    """The GRPO iteration shared by :class:`GRPOModule` and
    :class:`entreg.modules.grpo_pipeline.GRPOPipelineModule` (see :class:`GRPOModule` for what it does and logs).

    A subclass calls ``save_hyperparameters`` with the shared settings (``variant``, ``steps``, ``noise_level``,
    ``group_size``, ``prompts``, ...), then :meth:`init_grpo` with its time grid, and implements
    :meth:`policy` (the velocity of the trained or the reference model), :attr:`sample_shape`,
    :meth:`draw_prompts`, :meth:`reward_of`, :meth:`eval_cond` and :meth:`trainable_parameters`.
    """

    grid: list[float]

    def init_grpo(self, grid: list[float], optimizer: OptimizerFactory | None) -> None:
        """Validate the shared settings and set the grid, the variant, the optimizer factory and the counters."""
        self.variant_spec = check_grpo_settings(self.hparams)
        if len(grid) != self.hparams.steps + 1:
            raise ValueError(f"the grid has {len(grid) - 1} steps, expected steps={self.hparams.steps}")
        self.automatic_optimization = False
        self.grid, self.optimizer_factory = [float(t) for t in grid], optimizer
        self.iteration = 0
        self.counts = dict.fromkeys(COST_KEYS, 0)
        self.scoring_coarse = False

    # --- what a subclass provides ----------------------------------------------------------------------------

    def policy(self, reference: bool = False) -> Velocity:
        """``velocity(x, t, cond)`` of the trained model, or of the frozen reference (``reference=True``)."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (one state of the flow)."""
        raise NotImplementedError

    def draw_prompts(self, generator: torch.Generator) -> Tensor | None:
        """The ``prompts`` conditions of an iteration (None: unconditional), identical on every rank."""
        raise NotImplementedError

    def reward_of(self, samples: Tensor, cond: Tensor | None) -> Tensor:
        """Rewards (B,) of final samples (no gradient needed)."""
        raise NotImplementedError

    def eval_cond(self, n: int) -> Tensor | None:
        """The conditions of the ``n`` evaluation samples."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def train_metrics(self, collected: _Collected) -> dict[str, float]:
        """Metrics of an iteration's rollouts, logged under ``train/`` (averaged over ranks)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. an EMA update)."""

    def images_of(self, samples: Tensor) -> Tensor | None:
        """Evaluation samples as images in [0, 1] for TensorBoard (None: samples logged as they are)."""
        return None

    # --- rollouts --------------------------------------------------------------------------------------------

    def plans(self) -> list[RolloutPlan]:
        """The plans of this iteration: one for Flow-GRPO and MixGRPO, one per branch point otherwise."""
        return self.variant_spec.plans(self.hparams, self.iteration, self.grid)

    def _generator(self, purpose: int) -> torch.Generator:
        """Identical on every rank: seeded by ``seed``, the iteration and ``purpose``."""
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.iteration * 1009 + purpose)

    def _mine(self, n_members: int) -> Tensor:
        """This rank's member indices within a group: rank, rank + W, ..."""
        return torch.arange(self.global_rank, n_members, self.trainer.world_size if self._trainer else 1)

    def _noise(self, n: int, purpose: int) -> Tensor:
        return torch.randn(n, *self.sample_shape, generator=self._generator(purpose)).to(self.device)

    def _collect(self) -> _Collected:
        """Roll out this iteration's groups (this rank's members)."""
        h = self.hparams
        policy, prompts, mine = self.policy(), self.draw_prompts(self._generator(1)), self._mine(h.group_size)
        cond = None if prompts is None else prompts.repeat_interleave(h.group_size)
        parts: dict[str, list] = {"samples": [], "rewards": [], "groups": [], "conds": []}
        units: list[_Unit] = []
        g_sde = self._generator(3)  # SDE noise: drawn for every member on every rank, then sliced
        plans = self.plans()
        if not self.variant_spec.branched:
            (plan,) = plans
            shared = self.variant_spec.shared_noise  # MixGRPO: a group shares its states up to the window
            noise = self._noise(h.prompts if shared else h.prompts * h.group_size, 2)
            noise = noise.repeat_interleave(h.group_size, 0) if shared else noise
            out, mine_cond = self._rollout_group(policy, noise, plan, cond, g_sde, mine, 0, parts)
            rows_per_minibatch = h.prompts // h.minibatches * len(mine)
            for b in range(h.minibatches):
                rows = slice(b * rows_per_minibatch, (b + 1) * rows_per_minibatch)
                transitions = [self._slice_transition(tr, rows) for tr in out.transitions]
                unit_cond = None if mine_cond is None else mine_cond[rows]
                units.append(_Unit(transitions, torch.empty(0), unit_cond, len(mine) if shared else 1, plan.branch))
        else:
            anchor = ode_states(policy, self._noise(h.prompts, 2), self.grid, max(p.branch for p in plans), prompts)
            self.counts["sample_forwards"] += (len(anchor) - 1) * h.prompts  # every rank computes the whole anchor
            for k, plan in enumerate(plans):
                x = anchor[plan.branch].repeat_interleave(h.group_size, 0)
                out, mine_cond = self._rollout_group(policy, x, plan, cond, g_sde, mine, k * h.prompts, parts)
                units.append(_Unit(out.transitions, torch.empty(0), mine_cond, len(mine), plan.branch))
                self._coarse_rollouts(policy, plan, out, mine_cond, parts)
        x = torch.cat(parts["samples"])
        no_cond = torch.zeros(len(x), dtype=torch.long, device=x.device)
        populations = no_cond if cond is None else torch.cat(parts["conds"])
        coarse = [torch.cat(parts[f"coarse{g}"]) for g in self.hparams.granularities[1:]]
        return _Collected(units, x, torch.cat(parts["rewards"]), torch.cat(parts["groups"]), populations, coarse)

    def _coarse_rollouts(
        self, policy: Velocity, plan: RolloutPlan, out: Rollout, cond: Tensor | None, parts: dict[str, list]
    ) -> None:
        """G2RPO's multi-granularity rewards: from the sample of the plan's SDE step, the ODE again with steps of
        ``g`` grid intervals for every extra granularity ``g``; their rewards go to ``parts["coarse<g>"]``."""
        h = self.hparams
        (step,) = out.transitions
        for g in h.granularities[1:]:
            if step.segment.end == h.steps:  # nothing left to integrate: the same sample
                parts.setdefault(f"coarse{g}", []).append(parts["rewards"][-1])
                continue
            coarse = rollout(policy, step.sample, self.grid, coarsened(plan, g), h.noise_level, cond,
                             start=step.segment.end)  # fmt: skip
            self.counts["sample_forwards"] += coarse.nfe * len(coarse.sample)
            self.scoring_coarse = True  # reward_of may tell these apart from the trained rollouts
            try:
                parts.setdefault(f"coarse{g}", []).append(self._score(coarse.sample, cond))
            finally:
                self.scoring_coarse = False

    def _rollout_group(
        self,
        policy: Callable,
        x: Tensor,
        plan: RolloutPlan,
        cond: Tensor | None,
        g: torch.Generator,
        mine: Tensor,
        first_group: int,
        parts: dict[str, list],
    ) -> tuple[Rollout, Tensor | None]:
        """Roll out this rank's members of every prompt's group from ``x`` (all members, prompt-major) at the
        plan's branch, score them, count the cost and append samples, rewards, group ids (``first_group`` +
        prompt) and labels to ``parts``. The SDE noise of all members is drawn in order on every rank, so a
        member's noise does not depend on the number of ranks."""
        h = self.hparams
        rows = (torch.arange(h.prompts)[:, None] * h.group_size + mine[None, :]).flatten().to(self.device)
        start = plan.branch if self.variant_spec.branched else 0
        n_sde = len([s for s in plan.segments if s.kind == "sde" and s.start >= start])
        shape = (len(x), *self.sample_shape)
        noises = iter([torch.randn(shape, generator=g).to(self.device)[rows] for _ in range(n_sde)])
        mine_cond = None if cond is None else cond[rows]
        out = rollout(policy, x[rows], self.grid, plan, h.noise_level, mine_cond, start=start, reduce=h.reduce,
                      noises=noises, step_type=h.step_type)  # fmt: skip
        self.counts["sample_forwards"] += out.nfe * len(out.sample)
        parts["samples"].append(out.sample)
        parts["rewards"].append(self._score(out.sample, mine_cond))
        parts["groups"].append(first_group + torch.arange(h.prompts, device=self.device).repeat_interleave(len(mine)))
        parts["conds"].append(mine_cond)
        return out, mine_cond

    @staticmethod
    def _slice_transition(tr: Transition, rows: slice) -> Transition:
        return Transition(tr.segment, tr.t, tr.t_next, tr.x[rows], tr.sample[rows], tr.std, tr.log_prob[rows])

    def _score(self, samples: Tensor, cond: Tensor | None) -> Tensor:
        """Rewards (B,) in float32; a reward of another shape raises a ValueError naming it."""
        with torch.no_grad():
            rewards = torch.as_tensor(self.reward_of(samples, cond))
        if rewards.shape != (len(samples),):
            raise ValueError(
                f"the reward must return one value per sample, shape ({len(samples)},), got {tuple(rewards.shape)}"
            )
        self.counts["reward_calls"] += len(samples)
        return rewards.float().to(self.device)

    # --- training --------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        # an item per iteration: GRPO draws its own prompts and noise (seeded by the iteration)
        return epoch_steps_loader(self, self.hparams.iterations_per_epoch, lambda: self.iteration)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        factory = optimizer_or_default(self.optimizer_factory, torch.optim.AdamW, lr=1e-4)
        return factory(self.trainable_parameters())

    def _gather(self, x: Tensor) -> Tensor:
        """All ranks' ``x`` concatenated (rank order)."""
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x).reshape(-1, *x.shape[1:])

    def training_step(self, batch: Any, batch_idx: int) -> None:
        h = self.hparams
        self.eval()  # sampling and training use the same (deterministic) network
        collected = self._collect()
        units, n_mine = collected.units, len(collected.rewards)
        all_rewards, all_groups = self._gather(collected.rewards), self._gather(collected.groups)
        all_coarse = [self._gather(r) for r in collected.coarse_rewards]
        if not all(bool(torch.isfinite(r).all()) for r in (all_rewards, *all_coarse)):
            warnings.warn(f"iteration {self.iteration}: non-finite rewards, iteration skipped", stacklevel=2)
            self.iteration += 1
            return
        shaped = all_rewards
        if h.entropy_coef > 0:
            bonus = kde_entropy_bonus(
                self._gather(collected.samples), self._gather(collected.populations), h.entropy_bandwidth
            ).float()
            shaped = all_rewards + h.entropy_coef * bonus
            self.log("train/entropy_bonus", bonus.mean())
        advantages = group_advantages(shaped, all_groups, h.adv_eps, h.adv_clip, h.adv_std)
        for coarse in all_coarse:  # G2RPO / E-GRPO's code: the advantages of every granularity summed
            advantages = advantages + group_advantages(coarse, all_groups, h.adv_eps, h.adv_clip, h.adv_std)
        start = self.global_rank * n_mine
        mine = advantages[start : start + n_mine]
        offset = 0
        optimizer = self.optimizers()
        stats = {"clip_fraction": [], "approx_kl": [], "kl": [], "step_entropy": []}
        for unit in units:
            n = len(unit.transitions[0].x) if unit.transitions else 0
            unit.advantages = mine[offset : offset + n]
            offset += n
            if unit.transitions and self._unit_step(unit, stats, optimizer):
                self.after_optimizer_step()
        self._log_iteration(all_rewards, advantages, stats)
        train_metrics = self.train_metrics(collected)  # diversity etc. of this iteration's rollouts (this rank's)
        self.log_dict({f"train/{k}": float(v) for k, v in train_metrics.items()}, sync_dist=True)
        self.iteration += 1
        if h.eval_every and self.iteration % h.eval_every == 0:
            metrics, samples = self._evaluate()
            self.log_dict({f"eval/{k}": v for k, v in metrics.items()}, sync_dist=False)  # equal on every rank
            images = self.images_of(samples)
            if images is None:
                log_samples(self.trainer, samples, lambda x: ((x + 1) / 2).clamp(0, 1), "eval/samples")
            else:
                log_samples(self.trainer, images, lambda x: x, "eval/samples")

    def _chunks(self, unit: _Unit) -> list[slice]:
        """Row slices of a unit trained one after the other (``micro_batch`` rows, whole shared groups)."""
        n = len(unit.transitions[0].x)
        size = n if self.hparams.micro_batch is None else self.hparams.micro_batch
        size = max(1, size // unit.shared) * unit.shared
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _unit_step(self, unit: _Unit, stats: dict[str, list[Tensor]], optimizer: Any) -> bool:
        """Backward of the unit's loss chunk by chunk (gradients accumulate), then one optimizer step; False when
        a loss was not finite (step skipped, gradients dropped)."""
        optimizer.zero_grad()
        n = len(unit.transitions[0].x)
        for rows in self._chunks(unit):
            cond = None if unit.cond is None else unit.cond[rows]
            part = _Unit([self._slice_transition(tr, rows) for tr in unit.transitions], unit.advantages[rows], cond,
                         unit.shared, unit.branch)  # fmt: skip
            loss = self._unit_loss(part, stats) * ((rows.stop - rows.start) / n)
            if not bool(torch.isfinite(loss)):
                warnings.warn(f"iteration {self.iteration}: non-finite loss, optimizer step skipped", stacklevel=2)
                optimizer.zero_grad()
                return False
            self.manual_backward(loss)
        if self.hparams.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        return True

    def _unit_loss(self, unit: _Unit, stats: dict[str, list[Tensor]]) -> Tensor:
        h = self.hparams
        loss = torch.zeros((), device=self.device)
        for tr in unit.transitions:
            shared = unit.shared if tr.segment.start == unit.branch else 1
            log_prob, mean = self._log_prob(False, tr, unit.cond, shared, grad=True)
            self.counts["train_forward_backwards"] += len(tr.x) // shared
            policy_loss = clipped_surrogate_loss(
                log_prob, tr.log_prob, unit.advantages, h.clip_range, kl_estimator=KL_ESTIMATOR
            )
            step_loss = policy_loss.loss
            stats["clip_fraction"].append(policy_loss.clip_fraction)
            if tr.std > 0:  # nats per dimension of the step's Gaussian (a cps step to t = 0 has none)
                stats["step_entropy"].append(torch.tensor(math.log(tr.std) + HALF_LOG_2PI_E, device=self.device))
            stats["approx_kl"].append(policy_loss.approx_kl)
            if h.kl_coef > 0:
                with torch.no_grad():
                    _, base_mean = self._log_prob(True, tr, unit.cond, shared, grad=False)
                self.counts["sample_forwards"] += len(tr.x) // shared
                kl = gaussian_kl(mean, base_mean, tr.std, h.reduce).mean()
                step_loss = step_loss + h.kl_coef * kl
                stats["kl"].append(kl.detach())
            loss = loss + step_loss / len(unit.transitions)
        return loss

    def _log_prob(
        self, reference: bool, tr: Transition, cond: Tensor | None, shared: int, grad: bool
    ) -> tuple[Tensor, Tensor]:
        """log pi(sample | x) and the mean under the policy (or the reference); rows sharing their state
        (``shared`` consecutive) are evaluated once."""
        h = self.hparams
        x = tr.x[::shared]
        c = None if cond is None else cond[::shared]
        with torch.set_grad_enabled(grad):
            v = self.policy(reference)(x, torch.full((len(x),), tr.t, device=x.device, dtype=x.dtype), c)
            return transition_log_prob_of(v, tr, h.noise_level, self.grid[1], h.reduce, h.step_type)

    def _log_iteration(self, rewards: Tensor, advantages: Tensor, stats: dict[str, list[Tensor]]) -> None:
        values = {
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std(),
            "train/advantage_abs": advantages.abs().mean(),
        }
        for key, items in stats.items():
            if items:
                values[f"train/{key}"] = torch.stack(items).mean()
        self.log_dict(values, prog_bar=False, sync_dist=False)  # computed from all-gathered rewards already
        cost = {f"cost/{k}": float(v) for k, v in self.cost.items()}
        self.log_dict(cost, sync_dist=True, reduce_fx="sum")  # every rank counts its own work

    @property
    def cost(self) -> dict[str, int]:
        """This rank's work so far: ``sample_forwards``, ``train_forward_backwards``, ``reward_calls`` and
        ``units`` (compute units: forward 1, forward + backward 3)."""
        units = self.counts["sample_forwards"] + 3 * self.counts["train_forward_backwards"]
        return {**self.counts, "units": units}

    # --- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reward of ODE samples and path-KL to the reference along SDE trajectories, from fixed noise
        (seed + 1), and the subclass's evaluation metrics of the ODE samples."""
        return self._evaluate()[0]

    def eval_metrics_of(self, samples: Tensor, cond: Tensor | None) -> dict[str, float]:
        """Extra evaluation metrics of the ODE samples (none by default)."""
        return {}

    @torch.no_grad()
    def _evaluate(self) -> tuple[dict[str, float], Tensor]:
        h = self.hparams
        g = torch.Generator().manual_seed(h.seed + 1)
        n = h.eval_samples
        noise = torch.randn(n, *self.sample_shape, generator=g).to(self.device)
        cond = self.eval_cond(n)
        policy = self.policy()
        samples = rollout(policy, noise, self.grid, ode_plan(h.steps), h.noise_level, cond).sample
        metrics = {"reward": float(torch.as_tensor(self.reward_of(samples, cond)).float().mean())}
        noises = (torch.randn(noise.shape, generator=g).to(self.device) for _ in range(h.steps))
        sde = rollout(policy, noise, self.grid, flow_grpo_plan(h.steps), h.noise_level, cond, noises=noises,
                      step_type=h.step_type)  # fmt: skip
        path_kl = torch.zeros(n, device=self.device)
        for tr in sde.transitions:
            _, mean = self._log_prob(False, tr, cond, 1, grad=False)
            _, base_mean = self._log_prob(True, tr, cond, 1, grad=False)
            if tr.std > 0:  # a cps step to t = 0 is deterministic
                path_kl += gaussian_kl(mean, base_mean, tr.std, "sum")
        metrics["path_kl"] = float(path_kl.mean())
        metrics.update(self.eval_metrics_of(samples, cond))
        return metrics, samples

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["grpo"] = {"iteration": self.iteration, "cost": dict(self.counts)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("grpo", {})
        self.iteration = state.get("iteration", 0)
        self.counts = dict(state.get("cost", self.counts))


class GRPOModule(GRPOIterations):
    """Fine-tune a rectified-flow velocity network with a reward by group-relative policy optimisation.

    Every training iteration draws ``prompts`` prompts (class labels, or none for an unconditional model) and
    ``group_size`` rollouts per prompt on the shifted grid of ``steps`` levels, scores the final samples with
    ``reward``, normalises the rewards within each group (:func:`entreg.flow.grpo.group_advantages`) and takes
    PPO-clipped policy-gradient steps on the log-probabilities of the stochastic transitions
    (:mod:`entreg.flow.sde`). The variants differ in which transitions are stochastic
    (:mod:`entreg.flow.plans`):

    * ``flow_grpo``: every step SDE, independent noise per rollout; ``minibatches`` optimizer steps per
      iteration (the groups split between them);
    * ``mixgrpo``: an SDE window of ``window_size`` steps that moves one step towards the data every
      ``shift_every`` iterations within the first ``active_steps`` steps; shared noise within a group;
    * ``g2rpo`` / ``egrpo``: a deterministic anchor trajectory per prompt (shared noise); at every branch point
      ``group_size`` branches take one SDE step (E-GRPO: merged until its entropy reaches ``tau``; G2RPO:
      single steps) and continue by ODE; a group is the branches of one branch point; one optimizer step per
      branch point, as in the reference, and one forward for the shared branch state.

    Optional KL to the frozen base model (``kl_coef``): the closed form between the equal-variance Gaussian
    transitions, with the step length in the variance (:func:`entreg.flow.sde.gaussian_kl`).

    Logged every iteration: ``train/reward`` (mean, and ``_std``), ``train/advantage_abs``,
    ``train/clip_fraction``, ``train/approx_kl``, ``train/kl`` (to the base, when ``kl_coef`` > 0), the
    ``eval_metrics`` of the iteration's rollouts (e.g. ``train/balance``; averaged over ranks) and the cost
    counters ``cost/sample_forwards`` (rollout model evaluations, per sample), ``cost/train_forward_backwards``,
    ``cost/reward_calls`` and ``cost/units`` (forward = 1, forward + backward = 3), summed over ranks (the anchor
    trajectories of G2RPO/E-GRPO are computed on every rank and counted on each). Every ``eval_every``
    iterations, from fixed noise: ``eval/reward`` of deterministic (ODE) samples, ``eval/path_kl`` (the sum over
    all steps of the KL between the policy's and the base's SDE transitions along the policy's own SDE
    trajectories) and the metrics of ``eval_metrics(samples, cond)`` (e.g. diversity), under ``eval/``, with the
    samples as an image grid (or, for 2-D points, a 2-D histogram) ``eval/samples`` in TensorBoard.

    Multi-GPU: every rank draws the same prompts and noise (seeded by ``seed`` and the iteration) and keeps
    rollouts ``rank, rank + W, ...`` of each group, so a group's members sit on different ranks; rewards are
    all-gathered, so advantages use whole groups, and a W-process run equals the single-process one.

    Args:
        net: the velocity network, called ``net(x, time_scale * t)`` or ``net(x, time_scale * t,
            class_labels=c)``; fine-tuned in place (a frozen copy is the base model).
        reward: ``reward(samples, cond) -> (B,)`` (no gradient needed).
        sample_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        num_classes: draw class-label prompts from ``range(num_classes)``; None: unconditional.
        variant: a name in :data:`entreg.flow.variants.GRPO_VARIANTS`: ``flow_grpo``, ``mixgrpo``, ``g2rpo`` or
            ``egrpo`` (or one added with :func:`entreg.flow.variants.register_variant`).
        steps, shift: sampling grid (``steps`` levels, SD3 shift).
        noise_level: the SDE's ``a`` (sigma_t = a sqrt(t / (1 - t))).
        tau: E-GRPO's entropy threshold on exp(h) per dimension (:mod:`entreg.flow.plans`).
        active_steps: steps eligible for SDE (MixGRPO's window range, G2RPO/E-GRPO's branch points); default
            the first half (E-GRPO trains the first 8 of 16).
        window_size, shift_every: MixGRPO's window and how many iterations it stays at each position.
        group_size, prompts: rollouts per group and groups (prompts) per iteration (global, over all ranks).
        clip_range, adv_clip, adv_eps: PPO ratio clip, advantage clip, std epsilon.
        adv_std: ``"population"`` (default) or ``"unbiased"`` group std (E-GRPO's code: unbiased, eps 1e-8).
        step_type: ``"sde"`` (Euler-Maruyama) or ``"cps"`` (coefficients-preserving) stochastic steps
            (:data:`entreg.flow.sde.STEP_TYPES`).
        micro_batch: rows per forward/backward when training (gradients accumulated over a unit's chunks of
            groups before its optimizer step; None: the whole unit at once). The result is the same.
        granularities: G2RPO's multi-granularity advantages (``granular_list`` of E-GRPO's code, [1, 2] there;
            branched variants): after each branch's SDE step the ODE also runs with steps of ``g`` intervals for
            every ``g`` after the first (which must be 1: the trained rollout), each granularity's rewards get
            their own group advantages (each clipped), and a sample's advantage is their sum.
        kl_coef: weight of the KL to the base model (0: no reference forwards).
        entropy_coef, entropy_bandwidth: our diversity option (not in the papers): the reward of every sample
            gets ``entropy_coef`` times :func:`entreg.flow.grpo.kde_entropy_bonus` among the iteration's samples
            of its population (its class, or all samples when unconditional), so GRPO maximises
            ``E[r] + entropy_coef H``; logged as ``train/entropy_bonus``.
        reduce: log-probabilities as the mean (references) or sum over dimensions.
        minibatches: optimizer steps per iteration for ``flow_grpo`` and ``mixgrpo``.
        iterations_per_epoch: training iterations per Lightning epoch.
        time_scale: multiplies t before the network (1000 for :class:`entreg.modules.flow.FlowMatchingModule`).
        optimizer: factory ``params -> Optimizer``; default AdamW(lr=1e-4).
        grad_clip: max gradient norm (None: none).
        eval_every, eval_samples: evaluation period (0: never) and samples per evaluation.
        eval_metrics: ``(samples, cond) -> dict[str, float]`` added to the evaluation.
        seed: seed of prompts and noise.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Velocity(nn.Module):  # v(x, t) = b, a learnable constant
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.b = nn.Parameter(torch.zeros(2))
        ...     def forward(self, x, t):
        ...         return self.b.expand_as(x)
        >>> module = GRPOModule(Velocity(), reward=lambda x, c: -(x - 1).pow(2).sum(1), sample_shape=(2,),
        ...                     variant="egrpo", steps=4, group_size=4, prompts=2, eval_every=0)
        >>> trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(module)
        >>> module.cost["reward_calls"] > 0
        True
    """

    def __init__(
        self,
        net: nn.Module,
        reward: Reward,
        sample_shape: tuple[int, ...],
        num_classes: int | None = None,
        variant: str = "egrpo",
        steps: int = 16,
        shift: float = 3.0,
        noise_level: float = 0.7,
        tau: float = 2.2,
        active_steps: int | None = None,
        window_size: int = 4,
        shift_every: int = 25,
        group_size: int = 8,
        prompts: int = 4,
        clip_range: float = 1e-4,
        adv_clip: float = 5.0,
        adv_eps: float = 1e-4,
        adv_std: str = "population",
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        entropy_bandwidth: float | None = None,
        reduce: str = "mean",
        step_type: str = "sde",
        micro_batch: int | None = None,
        granularities: tuple[int, ...] = (1,),
        minibatches: int = 2,
        iterations_per_epoch: int = 100,
        time_scale: float = 1000.0,
        optimizer: OptimizerFactory | None = None,
        grad_clip: float | None = 1.0,
        eval_every: int = 10,
        eval_samples: int = 256,
        eval_metrics: Callable[[Tensor, Tensor | None], dict[str, float]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        active_steps = steps // 2 if active_steps is None else active_steps
        self.save_hyperparameters(ignore=["net", "reward", "optimizer", "eval_metrics"])
        self.init_grpo(time_grid(steps, shift).tolist() if steps >= 1 else [], optimizer)
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError("net has no trainable parameters (an EMA copy? call net.requires_grad_(True))")
        self.net, self.reward, self.eval_metrics = net, reward, eval_metrics
        self.base = copy.deepcopy(net).requires_grad_(False).eval()

    @classmethod
    def from_flow_checkpoint(cls, path: str | Path, reward: Reward, **kwargs: Any) -> GRPOModule:
        """Fine-tune the EMA network of a :class:`entreg.modules.flow.FlowMatchingModule` checkpoint (its sample
        shape, classes and time scale are taken from it; ``kwargs`` are the other arguments)."""
        from entreg.modules.flow import FlowMatchingModule

        base = FlowMatchingModule.load_checkpoint(path)
        net = copy.deepcopy(base.ema.module).requires_grad_(True)
        shape = tuple(base.sample_shape)
        return cls(net, reward, shape, num_classes=base.num_classes, time_scale=base.time_scale, **kwargs)

    def velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """``net``'s velocity at ``(x, t)`` (t in [0, 1])."""
        scaled = t * self.hparams.time_scale
        return net(x, scaled) if cond is None else net(x, scaled, class_labels=cond)

    def policy(self, reference: bool = False) -> Velocity:
        net = self.base if reference else self.net
        return lambda x, t, cond: self.velocity(net, x, t, cond)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.hparams.sample_shape)

    def draw_prompts(self, generator: torch.Generator) -> Tensor | None:
        h = self.hparams
        if h.num_classes is None:
            return None
        return torch.randint(0, h.num_classes, (h.prompts,), generator=generator).to(self.device)

    def reward_of(self, samples: Tensor, cond: Tensor | None) -> Tensor:
        return self.reward(samples, cond)

    def eval_cond(self, n: int) -> Tensor | None:
        h = self.hparams
        return None if h.num_classes is None else (torch.arange(n) % h.num_classes).to(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def train_metrics(self, collected: _Collected) -> dict[str, float]:
        if self.eval_metrics is None:
            return {}
        cond = None if self.hparams.num_classes is None else collected.populations
        return self.eval_metrics(collected.samples, cond)

    def eval_metrics_of(self, samples: Tensor, cond: Tensor | None) -> dict[str, float]:
        return {} if self.eval_metrics is None else self.eval_metrics(samples, cond)


# the settings GRPOIterations reads (besides the subclass's own), with GRPOModule's signature as their defaults
SHARED_SETTINGS = (
    "variant", "steps", "noise_level", "tau", "active_steps", "window_size", "shift_every", "group_size", "prompts",
    "clip_range", "adv_clip", "adv_eps", "adv_std", "kl_coef", "entropy_coef", "entropy_bandwidth", "reduce",
    "step_type", "micro_batch", "granularities", "minibatches", "iterations_per_epoch", "optimizer", "grad_clip",
    "eval_every", "seed",
)  # fmt: skip


def grpo_settings(given: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """The shared GRPO settings: :class:`GRPOModule`'s defaults, replaced by ``defaults``, then by ``given``;
    ``active_steps`` None becomes ``steps // 2``. An unknown name raises a TypeError naming the known ones.

    Example:
        >>> s = grpo_settings({"steps": 10}, group_size=12)
        >>> s["steps"], s["active_steps"], s["group_size"], s["variant"]
        (10, 5, 12, 'egrpo')
    """
    import inspect

    unknown = sorted(set(given) - set(SHARED_SETTINGS))
    if unknown:
        raise TypeError(f"unknown GRPO settings {unknown}; the shared ones are {sorted(SHARED_SETTINGS)}")
    signature = inspect.signature(GRPOModule.__init__).parameters
    settings = {name: signature[name].default for name in SHARED_SETTINGS} | defaults | dict(given)
    if settings["active_steps"] is None:
        settings["active_steps"] = settings["steps"] // 2
    return settings
