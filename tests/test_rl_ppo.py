"""PPO and PPO+ERA: GAE and advantage normalisation against hand-computed values, the rollout collector against
gymnasium's autoreset semantics and SB3's VecNormalize, NaN masking, DDP, exact resume, every config, and learning
(the loss terms: test_policy_gradient.py)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from entreg.cli import train
from entreg.distributions import HALF_LOG_2PI_E
from entreg.modules.ppo import PPOModule
from entreg.nn import GaussianERA
from entreg.rl.gae import gae
from entreg.rl.normalization import RunningMeanStd
from entreg.rl.ppo import GaussianActorCritic, RolloutCollector, normalize_advantages
from tests.helpers import EpochEnds, RecordingLogger, make_trainer, nan_pendulum_id

needs_mujoco = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs gymnasium[mujoco]")


# ----------------------------------------------------------------------------------------------- math
def test_gae_against_hand_computed_values_with_truncation_termination_and_a_masked_step():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # env 0: truncated at t=1 (bootstraps from the final observation's value 10); env 1: terminated at t=1
    # (its next value 100 is ignored), a NaN reward at t=3 (masked: it cuts the trace of t=2, which bootstraps)
    rewards = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, math.nan]])
    values = torch.tensor([[0.5, 1.0], [1.0, 1.0], [1.5, 1.0], [2.0, 1.0]])
    next_values = torch.tensor([[1.0, 1.0], [10.0, 100.0], [2.0, 5.0], [3.0, 1.0]])
    terminated = torch.tensor([[False, False], [False, True], [False, False], [False, False]])
    truncated = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    valid = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma, lam, valid)
    # env 0: deltas 1.4, 10.0, 3.3, 4.7; A3 = 4.7, A2 = 3.3 + 0.72 * 4.7, A1 = 10 (cut), A0 = 1.4 + 0.72 * 10
    # env 1: deltas 0.9, 0 (terminal), 4.5, masked; A3 = 0, A2 = 4.5, A1 = 0, A0 = 0.9
    expected = torch.tensor([[8.6, 0.9], [10.0, 0.0], [6.684, 4.5], [4.7, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)
    with pytest.raises(ValueError, match="one shape"):
        gae(rewards, values[:2], next_values, terminated, truncated)


def test_gae_equals_sb3_rollout_buffer_without_truncation():
    sb3 = pytest.importorskip("stable_baselines3.common.buffers")
    gym = pytest.importorskip("gymnasium")
    g = torch.Generator().manual_seed(0)
    t_len, n = 50, 3
    rewards, values = torch.randn(t_len, n, generator=g), torch.randn(t_len, n, generator=g)
    last_values = torch.randn(n, generator=g)
    dones = torch.rand(t_len, n, generator=g) < 0.1
    next_values = torch.cat([values[1:], last_values[None]])
    adv, _ = gae(rewards, values, next_values, dones, torch.zeros_like(dones), 0.99, 0.95)
    box = gym.spaces.Box(-1, 1, (1,))
    buffer = sb3.RolloutBuffer(t_len, box, box, gamma=0.99, gae_lambda=0.95, n_envs=n)
    starts = np.zeros(n, dtype=bool)
    for t in range(t_len):
        buffer.add(np.zeros((n, 1)), np.zeros((n, 1)), rewards[t].numpy(), starts, values[t], torch.zeros(n))
        starts = dones[t].numpy()
    buffer.compute_returns_and_advantage(last_values, starts)
    np.testing.assert_allclose(buffer.advantages, adv.numpy(), rtol=1e-5, atol=1e-5)


def test_normalize_advantages_uses_only_masked_entries():
    adv = torch.tensor([1.0, 2.0, 3.0, 1000.0])
    mask = torch.tensor([True, True, True, False])
    out = normalize_advantages(adv, mask)
    torch.testing.assert_close(out[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)  # std 1 (Bessel)


def test_running_mean_std_merges_batches_exactly_and_round_trips():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(100, 3))
    whole, parts = RunningMeanStd((3,), epsilon=1e-12), RunningMeanStd((3,), epsilon=1e-12)
    whole.update(x)
    parts.update(x[:37])
    parts.update(torch.from_numpy(x[37:]))
    np.testing.assert_allclose(parts.mean, x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(parts.var, x.var(0), rtol=1e-9)
    np.testing.assert_allclose(parts.var, whole.var, rtol=1e-12)
    copy = RunningMeanStd((3,))
    copy.load_state_dict(parts.state_dict())
    assert copy.count == parts.count and np.array_equal(copy.mean, parts.mean)
    assert float(copy.normalize(torch.tensor([[1e9, 0.0, 0.0]]))[0, 0]) == 10.0  # clipped
    with pytest.raises(ValueError, match="clip"):
        RunningMeanStd(clip=0.0)


def test_era_policy_entropy_is_exact_in_every_state_and_std_is_state_dependent():
    torch.manual_seed(0)
    net = GaussianActorCritic(5, 3, era=GaussianERA(3, target_entropy=0.6))
    for p in net.actor.parameters():  # a non-trivial actor
        torch.nn.init.normal_(p, std=1.0)
    _, log_std = net.policy(torch.randn(64, 5) * 3)
    torch.testing.assert_close(net.entropy(log_std), torch.full((64,), 0.6))
    assert float(log_std.detach().std(0).min()) > 0.01
    plain = GaussianActorCritic(5, 3, log_std_init=-0.5)
    _, log_std = plain.policy(torch.randn(4, 5))
    torch.testing.assert_close(plain.entropy(log_std), torch.full((4,), 3 * (HALF_LOG_2PI_E - 0.5)))
    with pytest.raises(ValueError, match="action_dim"):
        GaussianActorCritic(5, 2, era=GaussianERA(3))


# ----------------------------------------------------------------------------------------------- rollouts
def constant_policy(obs_dim: int, action_dim: int, action: float = 0.0) -> GaussianActorCritic:
    """Acts ``action`` (noise 1e-13) in every state."""
    net = GaussianActorCritic(obs_dim, action_dim)
    with torch.no_grad():
        for p in net.actor.parameters():
            p.zero_()
        net.actor[-1].bias.fill_(action)
        net.log_std.fill_(-30.0)
    return net


def vector_env(num_envs: int, same_step: bool, **kwargs):
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    mode = AutoresetMode.SAME_STEP if same_step else AutoresetMode.NEXT_STEP
    return SyncVectorEnv([lambda: gym.make("InvertedPendulum-v5", **kwargs)] * num_envs, autoreset_mode=mode)


def final_observation(steps: int, seed: int) -> np.ndarray:
    """The observation of a lone InvertedPendulum after ``steps`` zero actions from reset(seed)."""
    import gymnasium as gym

    env = gym.make("InvertedPendulum-v5")
    env.reset(seed=seed)
    for _ in range(steps):
        obs, *_ = env.step(np.zeros(1))
    return obs


@needs_mujoco
@pytest.mark.parametrize("same_step", [False, True])
def test_truncation_bootstraps_from_the_final_observation_in_both_autoreset_modes(same_step):
    collector = RolloutCollector(vector_env(1, same_step, max_episode_steps=5))
    collector.reset(seed=3)
    rollout = collector.collect(constant_policy(4, 1), 12, torch.Generator().manual_seed(0))
    truncated = rollout.truncated[:, 0].nonzero().flatten().tolist()
    final = torch.from_numpy(final_observation(5, seed=3)).float()
    torch.testing.assert_close(rollout.next_obs[4, 0], final, atol=1e-5, rtol=0)
    if same_step:  # the reset observation comes at once; no step is lost
        assert truncated == [4, 9] and bool(rollout.valid.all())
        assert not torch.allclose(rollout.obs[5, 0], final, atol=1e-3)
    else:  # the final observation is the next step's; that step is the reset (ignored action, masked)
        assert truncated == [4, 10]
        assert rollout.valid[:, 0].tolist() == [True] * 5 + [False] + [True] * 5 + [False]
        torch.testing.assert_close(rollout.obs[5, 0], final, atol=1e-5, rtol=0)
    assert not bool(rollout.terminated.any()) and rollout.episode_lengths == [5, 5]


@needs_mujoco
def test_collector_normalises_exactly_as_sb3_vecnormalize():
    env_util = pytest.importorskip("stable_baselines3.common.env_util")
    vec_env = pytest.importorskip("stable_baselines3.common.vec_env")
    steps, action = 200, 0.4  # a constant push: the pole falls every ~20 steps
    reference = vec_env.VecNormalize(env_util.make_vec_env("InvertedPendulum-v5", n_envs=2, seed=5), gamma=0.99)
    reference.reset()
    sb3_obs, sb3_rewards, sb3_dones = [], [], []
    for _ in range(steps):
        sb3_obs.append(reference.normalize_obs(reference.get_original_obs()))
        _, reward, done, _ = reference.step(np.full((2, 1), action))
        sb3_rewards.append(reward)
        sb3_dones.append(done)
    collector = RolloutCollector(vector_env(2, same_step=True), RunningMeanStd((4,)), RunningMeanStd(()), gamma=0.99)
    collector.reset(seed=5)
    rollout = collector.collect(constant_policy(4, 1, action), steps, torch.Generator().manual_seed(0))
    assert int(np.sum(sb3_dones)) > 10
    np.testing.assert_array_equal((rollout.terminated | rollout.truncated).numpy(), np.array(sb3_dones))
    np.testing.assert_allclose(rollout.obs.numpy(), np.array(sb3_obs), atol=1e-5)
    np.testing.assert_allclose(rollout.rewards.numpy(), np.array(sb3_rewards), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the module
def ppo(env_id: str = "InvertedPendulum-v5", **kwargs) -> PPOModule:
    options = {"num_envs": 2, "n_steps": 64, "batch_size": 32, "n_epochs": 2, "eval_every": 0, "seed": 3}
    return PPOModule(env_id, **{**options, **kwargs})


class FiniteWeights(L.Callback):
    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        assert all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        assert np.isfinite(pl_module.obs_rms.mean).all() and np.isfinite(pl_module.obs_rms.var).all()
        assert np.isfinite(pl_module.return_rms.var)
        self.checked += 1


@needs_mujoco
def test_nan_rewards_and_observations_are_masked_and_weights_stay_finite(tmp_path):
    module, logger, check = ppo(nan_pendulum_id()), RecordingLogger(), FiniteWeights()
    with pytest.warns(RuntimeWarning, match="non-finite observation or reward"):
        make_trainer(tmp_path, max_epochs=3, logger=logger, callbacks=[check]).fit(module)
    assert check.checked == 3 and module.skipped_updates == 0
    masked = logger.values("train/masked_steps")
    assert len(masked) == 3 and all(m >= 2 * 64 / 11 for m in masked)  # at least every NaN observation's step


class SameWeightsOnEveryRank(L.Callback):
    """On every worker after every rollout: equal weights and normalisers on both ranks, different envs."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        weights = pl_module.all_gather(torch.cat([p.detach().flatten() for p in pl_module.parameters()]))
        assert torch.equal(weights[0], weights[1])
        mean = pl_module.all_gather(torch.as_tensor(pl_module.obs_rms.mean))
        assert torch.equal(mean[0], mean[1])
        obs = pl_module.all_gather(torch.as_tensor(pl_module.collector.obs))
        assert not torch.equal(obs[0], obs[1])  # rank-offset seeds: each rank its own episodes

    def on_fit_end(self, trainer, pl_module) -> None:
        assert trainer.world_size == 2 and pl_module.env_steps == 2 * 2 * 64 * 2  # rollouts x ranks x steps x envs
        assert pl_module.rollouts == 2 and math.isfinite(float(trainer.callback_metrics["eval/return"]))


@needs_mujoco
def test_ddp_keeps_weights_identical_across_ranks(tmp_path):
    module = ppo(eval_every=512, eval_episodes=3)  # env steps: the second rollout of 2 ranks x 2 envs x 64 steps
    trainer = make_trainer(tmp_path, max_epochs=2, devices=2, strategy="ddp_fork", callbacks=[SameWeightsOnEveryRank()])
    trainer.fit(module)


class SaveFinalWeights(L.Callback):
    """Rank 0 writes its final weights to ``path`` (the workers of ddp_fork do not share the parent's module)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save([p.detach().clone() for p in pl_module.parameters()], self.path)


@needs_mujoco
def test_ddp_resume_restores_every_rank_and_continues_exactly(tmp_path):
    def ddp_fit(name: str, epochs: int, resume: Path | None = None) -> list[torch.Tensor]:
        weights = tmp_path / f"{name}.pt"
        callbacks = [ModelCheckpoint(dirpath=tmp_path / name, save_last=True), SaveFinalWeights(weights)]
        trainer = make_trainer(
            tmp_path, max_epochs=epochs, devices=2, strategy="ddp_fork", enable_checkpointing=True, callbacks=callbacks
        )
        trainer.fit(ppo(), ckpt_path=resume, weights_only=True)
        return torch.load(weights, weights_only=True)

    full = ddp_fit("full", 3)
    ddp_fit("half", 2)
    assert len(torch.load(tmp_path / "half" / "last.ckpt", weights_only=True)["ppo"]["ranks"]) == 2
    resumed = ddp_fit("resumed", 3, resume=tmp_path / "half" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True))


@needs_mujoco
def test_a_resume_on_fewer_ranks_keeps_the_epochs_at_the_same_env_steps(tmp_path):
    """An epoch of 512 env steps is 2 rollouts on 2 ranks (2 envs x 64 steps each) and 4 on 1 rank: resumed on 1
    rank after the first epoch, the run ends its epochs at 1024 and 1536 env steps, as on 2 ranks (with the epochs
    counted in rollouts, as before, they ended at 768 and 1792)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ddp", save_last=True)
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_fork", enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(ppo(steps_per_epoch=512))
    ends = EpochEnds()
    trainer = make_trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=[ends])
    with pytest.warns(UserWarning, match="no env and noise state for 1 rank"):
        trainer.fit(module := ppo(steps_per_epoch=512), ckpt_path=tmp_path / "ddp" / "last.ckpt", weights_only=True)
    assert ends.steps == [1024, 1536] and module.rollouts == 2 + 8


def fit(tmp_path: Path, epochs: int, resume: Path | None = None, **kwargs) -> tuple[PPOModule, RecordingLogger]:
    module, logger = ppo(eval_every=256, eval_episodes=1, **kwargs), RecordingLogger()  # every 2nd rollout
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(
        tmp_path, max_epochs=epochs, logger=logger, enable_checkpointing=True, callbacks=[checkpoint]
    )
    trainer.fit(module, ckpt_path=resume, weights_only=True)
    return module, logger


@needs_mujoco
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    full, full_log = fit(tmp_path / "full", 4)
    fit(tmp_path / "first_half", 2)
    resumed, resumed_log = fit(tmp_path / "resumed", 4, resume=tmp_path / "first_half" / "last.ckpt")
    assert resumed.env_steps == full.env_steps == 4 * 128
    resumed_state = resumed.state_dict()
    for key, value in full.state_dict().items():  # weights and normalisers (their extra state: tensors, a count)
        values = value.values() if isinstance(value, dict) else [value]
        others = resumed_state[key].values() if isinstance(value, dict) else [resumed_state[key]]
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(values, others, strict=True)), (
            key
        )
    np.testing.assert_array_equal(resumed.obs_rms.var, full.obs_rms.var)
    full_adam, resumed_adam = (m.optimizers().optimizer.state_dict()["state"] for m in (full, resumed))
    assert all(torch.equal(full_adam[k]["exp_avg_sq"], resumed_adam[k]["exp_avg_sq"]) for k in full_adam)
    for key in ("eval/return", "train/approx_kl", "rollout/episode_return"):
        assert resumed_log.values(key) == full_log.values(key)[-len(resumed_log.values(key)) :], key


@needs_mujoco
def test_resume_of_a_non_mujoco_env_warns_and_resets_the_envs(tmp_path):
    fit(tmp_path / "a", 1, env_id="Pendulum-v1")
    with pytest.warns(UserWarning, match="not restorable"):
        module, _ = fit(tmp_path / "b", 2, resume=tmp_path / "a" / "last.ckpt", env_id="Pendulum-v1")
    assert module.env_steps == 2 * 128


@needs_mujoco
def test_target_kl_stops_the_epochs_early(tmp_path):
    logger = RecordingLogger()
    make_trainer(tmp_path, max_epochs=2, logger=logger).fit(ppo(target_kl=1e-7))
    # the first minibatch starts at KL 0 and steps; the second sees KL > 1.5 target_kl and stops the update
    assert logger.values("train/updates") == [1.0, 1.0]


@needs_mujoco
def test_a_checkpoint_saved_after_fit_loads_the_policy_and_normaliser(tmp_path):
    module = ppo(era_entropy_per_dim=0.2)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "after.ckpt")  # the envs are closed: no env state in it
    loaded = PPOModule.load_from_checkpoint(tmp_path / "after.ckpt", weights_only=True)
    obs = torch.randn(5, 4) * 3
    assert torch.equal(loaded.act(obs), module.act(obs)) and loaded.policy.era.target_entropy == 0.2
    assert loaded.obs_rms.count == module.obs_rms.count > 100  # 128 steps less the final observations
    with pytest.warns(UserWarning, match="no env and noise state"):
        make_trainer(tmp_path, max_epochs=2).fit(loaded, ckpt_path=tmp_path / "after.ckpt", weights_only=True)


def test_constructor_rejects_invalid_settings():
    pytest.importorskip("gymnasium")
    with pytest.raises(ValueError, match="batch_size"):
        ppo(batch_size=1000)
    with pytest.raises(ValueError, match="ent_coef=0"):
        ppo(era_entropy_per_dim=0.0, ent_coef=0.01)
    with pytest.raises(ValueError, match="target_kl"):
        ppo(target_kl=0.0)


# ----------------------------------------------------------------------------------------------- configs
@needs_mujoco
def test_tensorboard_gets_the_rl_scalars_and_a_checkpoint_is_written(compose_train, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["experiment=invertedpendulum_ppo", "model.n_steps=64", "model.total_steps=128"]
    overrides += ["model.eval_episodes=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]
    train(compose_train(*overrides, "callbacks.model_summary=null", "trainer.accelerator=cpu", fast=False))
    (events,) = (tmp_path / "tensorboard").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {"rollout/episode_return", "eval/return", "train/policy_entropy", "train/approx_kl"}
    assert expected | {"train/clip_fraction", "perf/steps_per_s"} <= tags
    assert [e.step for e in accumulator.Scalars("eval/return")] == [128]  # x-axis: env steps
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


# ----------------------------------------------------------------------------------------------- learning
@needs_mujoco
@pytest.mark.parametrize(
    ("arm", "steps"),
    [({}, 10_240), ({"era_entropy_per_dim": 0.5}, 12_288), ({"init_entropy_per_dim": 0.5}, 10_240)],
    ids=["ppo", "ppo_era", "ppo_matched_std"],
)
def test_inverted_pendulum_reaches_900(arm, steps, tmp_path):
    module = PPOModule(
        "InvertedPendulum-v5", num_envs=4, n_steps=256, total_steps=steps, eval_episodes=5, seed=0, **arm
    )  # fmt: skip
    trainer = make_trainer(tmp_path, max_epochs=-1)
    trainer.fit(module)
    assert module.env_steps == steps
    assert float(trainer.callback_metrics["eval/return"]) >= 900
