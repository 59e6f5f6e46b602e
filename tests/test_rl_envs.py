"""entreg.rl.envs: construction, seeded evaluation, exact MuJoCo env state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from entreg.rl.envs import env_spaces, evaluate, get_env_state, make_env, make_vector_env, set_env_state


def test_make_env_steps_inverted_pendulum():
    env = make_env("InvertedPendulum-v5", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,)
    total, done, steps = 0.0, False, 0
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += reward
        steps += 1
        done = terminated or truncated
    # RecordEpisodeStatistics reports the finished episode
    assert info["episode"]["r"] == pytest.approx(total) and info["episode"]["l"] == steps
    env.close()


def test_unknown_id_lists_valid_ids():
    with pytest.raises(ValueError, match="HalfCheetah-v5"):
        make_env("HalfCheeta-v5")
    with pytest.raises(ValueError, match="unknown gymnasium env id"):
        make_env("Hopper-v99")


def test_vector_env_seeds_each_env():
    envs = make_vector_env("Hopper-v5", num_envs=2, seed=3)
    first, _ = envs.reset(seed=3)
    single = make_env("Hopper-v5")
    for i in range(2):
        obs, _ = single.reset(seed=3 + i)
        np.testing.assert_array_equal(first[i], obs)
    assert not np.array_equal(first[0], first[1])
    envs.close()
    with pytest.raises(ValueError, match="num_envs"):
        make_vector_env("Hopper-v5", 0, 0)


def test_evaluate_is_deterministic_and_depends_on_seed():
    weights = torch.tensor([[0.5, 2.0, 0.3, 0.6]])  # a linear controller that balances for a while

    def act(obs: torch.Tensor) -> torch.Tensor:
        assert obs.dtype == torch.float32 and obs.shape == (1, 4)
        return (obs * weights).sum(-1, keepdim=True)

    a = evaluate(act, "InvertedPendulum-v5", episodes=3, seed=7)
    b = evaluate(act, "InvertedPendulum-v5", episodes=3, seed=7)
    c = evaluate(act, "InvertedPendulum-v5", episodes=3, seed=8)
    assert len(a) == 3 and a == b
    assert a[1:] == c[:2]  # episode k is seeded seed + k
    with pytest.raises(ValueError, match="episodes"):
        evaluate(act, "InvertedPendulum-v5", episodes=0, seed=0)


@pytest.mark.parametrize("env_id", ["Hopper-v5", "dm_control/cheetah-run-v0"])
def test_env_state_round_trip_continues_exactly(env_id):
    """Through a checkpoint (torch.save, weights-only load): MuJoCo's integration state, the RNG (a legacy
    RandomState for dm_control tasks), the time limit and episode statistics, dm_control's step counter."""
    if env_id.startswith("dm_control"):
        pytest.importorskip("dm_control")
    _, action_space = env_spaces(env_id)
    rng = np.random.default_rng(0)
    actions = 0.1 * rng.uniform(action_space.low, action_space.high, size=(40, *action_space.shape))
    env = make_env(env_id, max_episode_steps=30)
    env.reset(seed=1)
    for a in actions[:10]:
        env.step(a)
    buffer = io.BytesIO()
    torch.save(get_env_state(env), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    rest = []  # up to the 30-step time limit (or a fall): truncation depends on the restored counter
    for a in actions[10:]:
        rest.append(env.step(a))
        if rest[-1][2] or rest[-1][3]:
            break
    env.reset()  # what the reset draws depends on the saved RNG state
    reset_obs = env.reset()[0]

    other = make_env(env_id, max_episode_steps=30)
    set_env_state(other, state)
    for a, (obs, reward, terminated, truncated, _) in zip(actions[10:], rest, strict=False):
        o, r, te, tr, i = other.step(a)
        np.testing.assert_array_equal(o, obs)
        assert (r, te, tr) == (reward, terminated, truncated)
    # the episode statistics continued too (not the wall-clock time "t")
    info = rest[-1][4]
    assert rest[-1][3] and len(rest) == 20  # truncated by the restored time-limit counter
    assert (i["episode"]["r"], i["episode"]["l"]) == (info["episode"]["r"], info["episode"]["l"])
    other.reset()
    np.testing.assert_array_equal(other.reset()[0], reset_obs)


def test_env_state_is_none_for_non_mujoco_envs():
    env = make_env("Pendulum-v1")
    env.reset(seed=0)
    assert get_env_state(env) is None


def test_dm_control_task_is_a_flat_seeded_gymnasium_env():
    """A DeepMind Control task through shimmy (extra entreg[dmc]): flat float observations, seeded resets that repeat
    exactly, a 1000-step episode ended by truncation, never by termination."""
    pytest.importorskip("shimmy")
    pytest.importorskip("dm_control")
    env = make_env("dm_control/cheetah-run-v0", seed=0)
    observations, actions = env_spaces("dm_control/cheetah-run-v0")
    assert observations.shape == (17,) and actions.shape == (6,)

    def episode(seed: int, steps: int) -> list[np.ndarray]:
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        trace = [obs]
        for _ in range(steps):
            obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 6))
            trace += [obs, np.array([reward, terminated, truncated], dtype=float)]
        return trace

    first, again, other = episode(3, 20), episode(3, 20), episode(4, 20)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (17,) and np.isfinite(np.concatenate(first)).all()
    env.reset(seed=0)
    for t in range(1, 1001):
        _, _, terminated, truncated, info = env.step(np.zeros(6))
        assert not terminated and truncated == (t == 1000)
    assert info["episode"]["l"] == 1000
    env.close()


def test_dm_control_envs_do_not_repeat_mujocos_deprecation_of_the_suites_xml(caplog):
    """dm_control's cheetah XML uses ``settotalmass``, which MuJoCo deprecates with a warning at every build (every
    evaluation episode set): that one message is dropped, other warnings of dm_control's logger still pass."""
    pytest.importorskip("shimmy")
    pytest.importorskip("dm_control")
    import logging

    with caplog.at_level(logging.WARNING):
        make_env("dm_control/cheetah-run-v0").close()
        logging.getLogger("absl").warning("another MuJoCo warning")
    assert "settotalmass" not in caplog.text and "another MuJoCo warning" in caplog.text


def test_dm_control_ids_say_how_to_install_them(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_shimmy(name, *args, **kwargs):
        if name == "shimmy":
            raise ImportError("no shimmy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_shimmy)
    with pytest.raises(ImportError, match=r"entreg\[dmc\]"):
        make_env("dm_control/cheetah-run-v0")


def test_dm_control_import_does_not_warn_that_a_headless_machine_has_no_display():
    """dm_control's import tries GLFW, which warns when DISPLAY is unset before dm_control falls back to EGL or
    OSMesa; entreg drops that one warning (its import runs in a fresh process, with DISPLAY unset and warnings on)."""
    pytest.importorskip("shimmy")
    pytest.importorskip("dm_control")
    import os
    import subprocess
    import sys

    code = "from entreg.rl.envs import make_env; make_env('dm_control/cheetah-run-v0').close(); print('made')"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MUJOCO_GL", "WAYLAND_DISPLAY")}
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "made" in run.stdout, run.stderr
    assert "DISPLAY" not in run.stderr, run.stderr
