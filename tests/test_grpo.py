"""GRPO for flow models: advantages, the entropy bonus and GRPOModule on an exact Gaussian-mixture policy."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch

from entreg.flow.grpo import group_advantages, kde_entropy_bonus
from entreg.flow.plans import egrpo_merges
from entreg.modules.grpo import GRPOModule
from tests.flow_toy import MixtureVelocity, ring_means

TARGETS = ring_means()[:3].float()


def region_reward(x: torch.Tensor, cond=None) -> torch.Tensor:
    """max over 3 of the 8 ring modes of exp(-|x - m|^2 / 0.5)."""
    return torch.exp(-torch.cdist(x.float(), TARGETS).pow(2) / 0.5).max(1).values


def make_module(variant: str, frozen: bool = False, **kwargs) -> tuple[GRPOModule, MixtureVelocity]:
    torch.manual_seed(0)
    net = MixtureVelocity(ring_means(), 0.25, time_scale=1000.0).requires_grad_(not frozen)
    options = {
        "variant": variant,
        "steps": 8,
        "group_size": 8,
        "prompts": 4,
        "eval_every": 0,
        "iterations_per_epoch": 12,
        "optimizer": partial(torch.optim.Adam, lr=0.05),
        "shift_every": 3,
        "window_size": 2,
        **kwargs,
    }
    return GRPOModule(net, region_reward, (2,), **options), net


def fit(module: GRPOModule, epochs: int = 1, ckpt_path: str | None = None, callbacks: tuple = ()) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_group_advantages_normalise_within_groups_and_clip():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 0.0, 5.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 9, 9])
    adv = group_advantages(rewards, groups, eps=0.0, clip=100.0)
    for g in (7, 3, 9):
        r = rewards[groups == g]
        expected = (r - r.mean()) / r.std(unbiased=False) if r.std() > 0 else torch.zeros_like(r)
        torch.testing.assert_close(adv[groups == g], expected)
    big = group_advantages(torch.tensor([0.0] * 9 + [1.0]), torch.zeros(10, dtype=torch.long), clip=2.0)
    assert float(big.max()) == 2.0  # (1 - 0.1) / 0.3 = 3 clipped to 2
    with pytest.raises(ValueError, match="equal length"):
        group_advantages(rewards, groups[:3])


@pytest.mark.parametrize("variant", ["flow_grpo", "mixgrpo", "g2rpo", "egrpo"])
def test_every_variant_moves_mass_to_the_rewarded_modes(variant):
    """The policy is the exact velocity of the 8-mode ring with learnable mode weights: 12 iterations must
    raise the weight of the 3 rewarded modes (3/8 at the start) and the reward of ODE samples."""
    module, net = make_module(variant)
    before = module.evaluate()["reward"]
    fit(module)
    weight = float(torch.softmax(net.logits.detach(), 0)[:3].sum())
    after = module.evaluate()
    assert weight > 0.45 and after["reward"] > before + 0.08, (weight, before, after)
    assert after["path_kl"] > 0  # the policy moved away from the base


def test_cost_counters_follow_each_plan():
    h = {"steps": 8, "group_size": 8, "prompts": 4}
    flow, _ = make_module("flow_grpo", iterations_per_epoch=2)
    fit(flow)
    per_iteration = h["steps"] * h["prompts"] * h["group_size"]
    assert flow.cost == {"sample_forwards": 2 * per_iteration, "train_forward_backwards": 2 * per_iteration,
                         "reward_calls": 2 * h["prompts"] * h["group_size"], "units": 8 * per_iteration}  # fmt: skip
    egrpo, _ = make_module("egrpo", iterations_per_epoch=2)
    fit(egrpo)
    merges = egrpo_merges(egrpo.grid, 0.7, 2.2, 4)
    anchor = max(start for start, _ in merges) * h["prompts"]
    branches = sum(1 + (h["steps"] - start - length) for start, length in merges) * h["prompts"] * h["group_size"]
    assert egrpo.cost == {"sample_forwards": 2 * (anchor + branches),
                          "train_forward_backwards": 2 * len(merges) * h["prompts"],  # one per shared state
                          "reward_calls": 2 * len(merges) * h["prompts"] * h["group_size"],
                          "units": 2 * (anchor + branches) + 3 * 2 * len(merges) * h["prompts"]}  # fmt: skip


def test_kl_to_the_base_keeps_the_policy_closer():
    free, _ = make_module("mixgrpo")
    fit(free)
    tied, _ = make_module("mixgrpo", kl_coef=50.0)
    fit(tied)
    assert tied.evaluate()["path_kl"] < 0.5 * free.evaluate()["path_kl"]


def test_runs_are_reproducible_and_resume_exactly(tmp_path):
    straight, net_a = make_module("egrpo", iterations_per_epoch=3)
    fit(straight, epochs=2)
    first, _ = make_module("egrpo", iterations_per_epoch=3)
    trainer = fit(first, epochs=1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed, net_b = make_module("egrpo", iterations_per_epoch=3)
    fit(resumed, epochs=2, ckpt_path=str(tmp_path / "one.ckpt"))
    assert resumed.iteration == straight.iteration == 6 and resumed.cost == straight.cost
    torch.testing.assert_close(net_b.logits, net_a.logits, rtol=0, atol=0)


def test_a_ctrl_c_mid_epoch_checkpoints_the_exact_state(tmp_path):
    """As entreg-finetune runs it: Ctrl-C during iteration 4 (of an epoch of 3) writes the state after it, and the
    resumed run ends where the uninterrupted one does."""
    from entreg.callbacks import InterruptCheckpoint, TrainingInterrupted
    from tests.helpers import SignalDuringBatch

    straight, net_a = make_module("egrpo", iterations_per_epoch=3)
    fit(straight, epochs=3)
    first, _ = make_module("egrpo", iterations_per_epoch=3)
    with pytest.raises(TrainingInterrupted):
        fit(
            first,
            epochs=3,
            callbacks=(SignalDuringBatch(lambda _, m: m.iteration == 4), InterruptCheckpoint(dirpath=tmp_path)),
        )
    assert first.iteration == 5
    resumed, net_b = make_module("egrpo", iterations_per_epoch=3)
    fit(resumed, epochs=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.iteration == straight.iteration == 9 and resumed.cost == straight.cost
    torch.testing.assert_close(net_b.logits, net_a.logits, rtol=0, atol=0)


def test_non_finite_rewards_skip_the_iteration():
    module, net = make_module("g2rpo", iterations_per_epoch=1)
    module.reward = lambda x, c: torch.full((len(x),), float("nan"))
    start = net.logits.detach().clone()
    with pytest.warns(UserWarning, match="non-finite rewards"):
        fit(module)
    assert torch.equal(net.logits, start) and module.iteration == 1


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variant": "ppo"}, "variant must be one of"),
        ({"variant": "egrpo", "active_steps": 9}, "active_steps"),
        ({"variant": "flow_grpo", "group_size": 1}, "group_size >= 2"),
        ({"variant": "mixgrpo", "window_size": 5}, "window_size"),
        ({"variant": "flow_grpo", "prompts": 3, "minibatches": 2}, "divisible"),
        ({"variant": "egrpo", "noise_level": 0.0}, "noise_level > 0"),
        ({"variant": "egrpo", "frozen": True}, "no trainable parameters"),
    ],
)
def test_bad_configuration_raises_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        make_module(**options)


def test_kde_entropy_bonus_is_the_kernel_log_density_per_population_and_bounded():
    g = torch.Generator().manual_seed(0)
    x, populations = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    bonus = kde_entropy_bonus(x, populations, bandwidth=2.0)
    for i in range(7):
        members = [j for j in range(7) if populations[j] == populations[i]]
        density = sum(math.exp(-float((x[i] - x[j]).pow(2).sum()) / 2.0) for j in members) / len(members)
        assert float(bonus[i]) == pytest.approx(-math.log(density))
    far = torch.tensor([[0.0], [0.1], [1e6]], dtype=torch.float64)
    assert float(kde_entropy_bonus(far, torch.zeros(3, dtype=torch.long), 1.0)[2]) == pytest.approx(math.log(3))
    assert float(kde_entropy_bonus(x[:1], populations[:1])[0]) == 0.0
    with pytest.raises(ValueError, match="bandwidth"):
        kde_entropy_bonus(x, populations, bandwidth=0.0)


def rewarded_mode_balance(net: MixtureVelocity) -> float:
    """Entropy of the weights of the 3 rewarded modes, normalised to [0, 1]."""
    w = torch.softmax(net.logits.detach(), 0)[:3]
    w = w / w.sum()
    return float(-(w * w.log()).sum() / math.log(3))


def test_entropy_bonus_keeps_the_rewarded_modes_balanced():
    """MixGRPO without the bonus favours one of the 3 equally rewarded modes; with entropy_coef = 0.1 the
    weights stay even while the reward still climbs (60 iterations)."""
    results = {}
    for coef in (0.0, 0.1):
        module, net = make_module("mixgrpo", iterations_per_epoch=60, shift_every=15, entropy_coef=coef)
        base = module.evaluate()["reward"]
        fit(module)
        results[coef] = (rewarded_mode_balance(net), module.evaluate()["reward"])
    assert results[0.1][0] > results[0.0][0] + 0.02 and results[0.1][0] > 0.99, results
    assert results[0.1][1] > base + 0.3, (base, results)


class ExpectWeights(L.Callback):
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def on_train_end(self, trainer, pl_module) -> None:
        assert trainer.world_size == 2
        # float32 rollouts: the two processes reduce the loss and gradients in another order (~3e-7 apart)
        torch.testing.assert_close(pl_module.net.logits.detach(), self.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["flow_grpo", "egrpo"])
def test_two_processes_equal_one_process(variant):
    """Each rank rolls out half of every group; rewards are all-gathered for the group statistics and DDP
    averages the gradients, so the weights after 3 iterations equal the one-process run's."""
    one, net = make_module(variant, iterations_per_epoch=3)
    fit(one)
    assert not torch.equal(net.logits, make_module(variant)[1].logits)
    two, _ = make_module(variant, iterations_per_epoch=3)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ExpectWeights(net.logits.detach())],
    )  # fmt: skip
    trainer.fit(two)


def test_a_registered_variant_runs_without_touching_the_others():
    """A variant is one spec: a late-window Flow-GRPO (SDE on the last 2 of 8 steps only) registered here trains
    through GRPOModule, rolls out exactly its plan's SDE steps, and needs no change anywhere else."""
    from entreg.flow.plans import mixgrpo_plan
    from entreg.flow.variants import GRPO_VARIANTS, GRPOVariant, get_variant, register_variant

    late = GRPOVariant(lambda settings, iteration, grid: [mixgrpo_plan(settings.steps, settings.steps - 2, 2)], False)
    register_variant("late_window", late)
    try:
        module, _ = make_module("late_window", iterations_per_epoch=2)
        assert module.variant_spec is late
        (plan,) = module.plans()
        assert [(s.start, s.end) for s in plan.sde_segments] == [(6, 7), (7, 8)]
        fit(module)
        rollouts = 2 * 8 * 4  # iterations x group_size x prompts
        assert module.cost["sample_forwards"] == rollouts * 8 and module.cost["train_forward_backwards"] == rollouts * 2
        with pytest.raises(ValueError, match="registered already"):
            register_variant("late_window", late)
    finally:
        GRPO_VARIANTS.pop("late_window")
    hint = r"variant must be one of \[.*'egrpo'.*\], got 'egrpoo' \(did you mean 'egrpo'\?\)"
    with pytest.raises(ValueError, match=hint):
        get_variant("egrpoo")


def test_unbiased_std_option_matches_e_grpos_code():
    """VisualGRPO normalises by torch.std (unbiased) + 1e-8; entreg's default (population std + 1e-4) gives
    advantages sqrt(G / (G - 1)) larger, 4.4% at G = 12."""
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    groups = torch.zeros(12, dtype=torch.long)
    theirs = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    torch.testing.assert_close(group_advantages(rewards, groups, 1e-8, 100.0, std="unbiased"), theirs)
    ratio = group_advantages(rewards, groups, 0.0, 100.0) / group_advantages(rewards, groups, 0.0, 100.0, "unbiased")
    torch.testing.assert_close(ratio, torch.full((12,), math.sqrt(12 / 11)))
    with pytest.raises(ValueError, match="std must be one of"):
        group_advantages(rewards, groups, std="sample")


@pytest.mark.parametrize("variant", ["flow_grpo", "egrpo"])
def test_micro_batches_accumulate_to_the_same_update(variant):
    whole, net_a = make_module(variant, iterations_per_epoch=2)
    fit(whole)
    chunked, net_b = make_module(variant, iterations_per_epoch=2, micro_batch=4)
    fit(chunked)
    torch.testing.assert_close(net_b.logits, net_a.logits, rtol=0, atol=1e-6)


def test_multi_granularity_rewards_come_from_coarser_continuations_and_cost_their_forwards():
    """granularities (1, 2), as E-GRPO's code: every branch's SDE sample is continued again by ODE steps of 2
    intervals; those rewards are the reward of exactly that continuation, and they cost their forwards and calls."""
    from entreg.flow.plans import coarsened
    from entreg.flow.rollout import rollout

    single, _ = make_module("egrpo", iterations_per_epoch=1)
    fit(single)
    module, _ = make_module("egrpo", iterations_per_epoch=1, granularities=(1, 2))
    collected = module._collect()
    (coarse,) = collected.coarse_rewards
    assert coarse.shape == collected.rewards.shape
    rows = 0
    for unit, plan in zip(collected.units, module.plans(), strict=True):
        (step,) = unit.transitions
        again = rollout(module.policy(), step.sample, module.grid, coarsened(plan, 2), 0.7, start=step.segment.end)
        n = len(step.sample)
        torch.testing.assert_close(coarse[rows : rows + n], region_reward(again.sample))
        rows += n
    fit(module)
    assert module.cost["reward_calls"] == 2 * 2 * single.cost["reward_calls"]  # _collect above + 1 iteration, x 2
    with pytest.raises(ValueError, match="branched variant"):
        make_module("flow_grpo", granularities=(1, 2))
    with pytest.raises(ValueError, match="starting with 1"):
        make_module("egrpo", granularities=(2,))


# ---- the compute budget ------------------------------------------------------------------------------------------


def test_compute_budget_stops_at_the_first_iteration_that_reaches_it_and_records_the_evaluations(tmp_path):
    """A budget of 2.5 iterations stops after the third (the epoch has 12); with eval_every=2 the history holds
    the evaluations at the start, after iteration 2 and at the stop, each with the cost counters; it is the
    callback's checkpoint state, and a resumed run continues it."""
    from entreg.callbacks import ComputeBudget

    one, _ = make_module("flow_grpo", iterations_per_epoch=1)
    fit(one)
    per_iteration = one.cost["units"]
    module, _ = make_module("flow_grpo")
    budget = ComputeBudget(2.5 * per_iteration, eval_every=2)
    trainer = fit(module, callbacks=(budget,))
    assert module.iteration == 3 and module.cost["units"] == 3 * per_iteration
    assert [entry["iteration"] for entry in budget.history] == [0, 2, 3]
    assert [entry["units"] for entry in budget.history] == [0, 2 * per_iteration, 3 * per_iteration]
    assert set(budget.history[-1]) >= {"reward", "path_kl", "sample_forwards", "reward_calls", "seconds"}
    assert budget.history[-1]["reward"] == pytest.approx(module.evaluate()["reward"])
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    resumed, _ = make_module("flow_grpo")
    more = ComputeBudget(4 * per_iteration, eval_every=2)
    fit(resumed, epochs=2, ckpt_path=str(tmp_path / "stopped.ckpt"), callbacks=(more,))  # the stop ended epoch 0
    assert resumed.iteration == 4 and [entry["iteration"] for entry in more.history] == [0, 2, 3, 4]
    assert more.history[:3] == budget.history

    quiet = ComputeBudget(per_iteration)  # eval_every=0: it only stops
    fit(make_module("flow_grpo")[0], callbacks=(quiet,))
    assert quiet.history == []


class ExpectStop(L.Callback):
    """Asserts on each worker that the budget stopped it after ``iteration`` iterations, with its evaluations."""

    def __init__(self, budget, iteration: int) -> None:
        self.budget, self.iteration = budget, iteration

    def on_train_end(self, trainer, pl_module) -> None:
        assert trainer.world_size == 2 and pl_module.iteration == self.iteration
        assert [entry["iteration"] for entry in self.budget.history] == list(range(self.iteration + 1))


def test_compute_budget_stops_every_rank_at_the_same_iteration():
    """Two ranks each roll out half of every Flow-GRPO group, so each counts half the units of one process: a budget
    of one process's iteration stops both after the second iteration."""
    from entreg.callbacks import ComputeBudget

    one, _ = make_module("flow_grpo", iterations_per_epoch=1)
    fit(one)
    budget = ComputeBudget(one.cost["units"], eval_every=1)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[budget, ExpectStop(budget, 2)],
    )  # fmt: skip
    trainer.fit(make_module("flow_grpo")[0])


def test_compute_budget_rejects_bad_settings_and_modules_without_a_cost():
    from lightning.pytorch.demos.boring_classes import BoringModel

    from entreg.callbacks import ComputeBudget

    for units, eval_every, message in [(0, 0, "units must be a finite number > 0"), (1e3, -1, "eval_every must be")]:
        with pytest.raises(ValueError, match=message):
            ComputeBudget(units, eval_every)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ComputeBudget(10.0)])  # fmt: skip
    with pytest.raises(TypeError, match=r"needs a module that counts its compute .* BoringModel does not"):
        trainer.fit(BoringModel())


def test_entreg_finetune_takes_the_budget_as_a_callback_override():
    """The override configs/finetune.yaml documents builds the callback next to the default ones."""
    from hydra import compose, initialize_config_module

    from entreg.callbacks import ComputeBudget
    from entreg.cli import instantiate_group

    overrides = ["base_checkpoint=unused", "paths.output_dir=unused",
                 "+callbacks.budget._target_=entreg.callbacks.ComputeBudget", "+callbacks.budget.units=3e5",
                 "+callbacks.budget.eval_every=10"]  # fmt: skip
    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("finetune", overrides=overrides)
    (budget,) = [c for c in instantiate_group(cfg.callbacks) if isinstance(c, ComputeBudget)]
    assert (budget.units, budget.eval_every) == (3e5, 10)
