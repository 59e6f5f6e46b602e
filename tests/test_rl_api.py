"""One RL API for SAC and PPO: run length, evaluation and checkpoint periods in env steps with the same names, the
same evaluation record and policy tags, the LearningCurve callback, the env config group, the PPO control arm."""

from __future__ import annotations

import math
from pathlib import Path

import entreg.configs
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from entreg.callbacks import LearningCurve
from entreg.distributions import HALF_LOG_2PI_E

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from entreg.modules.ppo import PPOModule
from entreg.modules.sac import SACModule
from entreg.rl.envs import Evaluation
from tests.helpers import EpochEnds

CONFIG_DIR = Path(entreg.configs.__file__).parent
RL_MODELS = sorted(
    p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem.startswith(("sac", "ppo"))
)  # every RL agent config
ENVS = sorted(p.stem for p in (CONFIG_DIR / "env").glob("*.yaml"))
COMMON = {"total_steps": 256, "eval_every": 128, "steps_per_epoch": 128, "eval_episodes": 2, "seed": 0}


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = {"max_epochs": -1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    options |= {"enable_model_summary": False, "accelerator": "cpu", "default_root_dir": tmp_path}
    return L.Trainer(**(options | kwargs))


def agents(**overrides) -> dict[str, L.LightningModule]:
    """SAC and PPO on InvertedPendulum with the same run length, periods and evaluation settings."""
    common = COMMON | overrides
    sac = SACModule("InvertedPendulum-v5", learning_starts=64, batch_size=16, hidden=(8, 8), log_every=64, **common)
    ppo = PPOModule("InvertedPendulum-v5", n_steps=64, batch_size=32, n_epochs=1, hidden=(8, 8), **common)
    return {"sac": sac, "ppo": ppo}


@pytest.mark.parametrize("name", ["sac", "ppo"])
def test_both_agents_count_in_env_steps_and_record_the_same_curve(name, tmp_path):
    module = agents()[name]
    curve = LearningCurve(path=tmp_path / "curve.json")
    fit = trainer(tmp_path, callbacks=[curve])
    fit.fit(module)
    assert module.env_steps == 256 and fit.current_epoch == 2  # steps_per_epoch 128: two epochs
    assert [point["step"] for point in curve.points] == [128, 256]
    record = module.evaluate()
    assert isinstance(record, Evaluation) and record.step == 256 and record.seed == 10_000 and len(record) == 2
    assert record.returns == tuple(curve.points[-1]["returns"])  # deterministic: the same episodes again
    assert curve.final() == curve.points[-1]["mean"] == pytest.approx(float(fit.callback_metrics["eval/return"]))
    assert curve.auc() == pytest.approx((curve.points[0]["mean"] + curve.points[1]["mean"]) / 2)
    for tag in ("policy/std", "policy/entropy", "policy/gaussian_entropy", "eval/return", "perf/steps_per_s"):
        assert math.isfinite(float(fit.callback_metrics[tag])), tag
        assert tag.startswith(("eval", "perf")) or math.isfinite(curve.points[-1][tag])
    assert (tmp_path / "curve.json").is_file()
    restored = LearningCurve()
    restored.load_state_dict(curve.state_dict())
    assert restored.points == curve.points


class StopAt(L.Callback):
    """Stops a fit after training batch ``at``: by a signal (InterruptCheckpoint saves that step), or as a crash
    (only the checkpoint of the last epoch end is left, as after SIGKILL)."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how, self.batches = at, how, 0

    def on_train_batch_end(self, *args) -> None:
        import signal

        self.batches += 1
        if self.batches == self.at:
            if self.how == "crash":
                raise RuntimeError("crash")
            signal.raise_signal(getattr(signal, self.how.upper()))


def fit_stopped(name: str, folder: Path, at: int, how: str, **overrides) -> None:
    from entreg.callbacks import TrainingInterrupted, fit_learning_curve

    with pytest.raises(TrainingInterrupted if how != "crash" else RuntimeError) as stopped:
        fit_learning_curve(agents(**overrides)[name], folder, callbacks=[StopAt(at, how)])
    assert (folder / "last.ckpt").is_file()
    if how != "crash":
        assert stopped.value.signal_name == how.upper() and stopped.value.code == 128 + (2 if how == "sigint" else 15)


@pytest.mark.parametrize(
    ("name", "at", "how"), [("sac", 200, "sigint"), ("sac", 200, "crash"), ("ppo", 3, "sigterm"), ("ppo", 3, "crash")]
)
def test_fit_learning_curve_resumes_a_stopped_run_exactly(name, at, how, tmp_path):
    """A run stopped mid-epoch (SAC at env step 200 of 256, epochs of 128; PPO after its 3rd of 4 rollouts) by
    Ctrl-C, SIGTERM (raised as TrainingInterrupted, not Lightning's silent exit) or a crash, and fitted again from
    its folder, ends with the uninterrupted run's curve and weights; the folder is then gone."""
    from entreg.callbacks import fit_learning_curve

    full, full_seconds, segments = fit_learning_curve(uninterrupted := agents()[name])
    assert segments == 1 and full_seconds > 0 and [p["step"] for p in full.points] == [128, 256]
    folder = tmp_path / "run"
    fit_stopped(name, folder, at, how)
    curve, seconds, segments = fit_learning_curve(resumed := agents()[name], folder)
    assert segments == 2 and seconds > 0 and not folder.exists()
    assert curve.points == full.points
    torch.testing.assert_close(resumed.state_dict(), uninterrupted.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "at"), [("sac", 200), ("ppo", 3)])
def test_a_run_resumed_mid_epoch_ends_its_epochs_where_the_uninterrupted_run_does(name, at, tmp_path):
    """Stopped mid-epoch (SAC at env step 200, PPO after its 3rd rollout, at 192; epochs of 128 steps), the resumed
    fit finishes that epoch at 256, not a whole epoch after the stop, and Lightning does not warn that the data
    cannot resume (the agent's checkpoint holds its position; the loader's items are placeholders)."""
    import warnings

    from entreg.callbacks import fit_learning_curve

    folder = tmp_path / "run"
    fit_stopped(name, folder, at, "sigterm", total_steps=384)
    ends = EpochEnds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_learning_curve(agents(total_steps=384)[name], folder, callbacks=[ends])
    assert ends.steps == [256, 384]
    assert not [w for w in caught if "not resumable" in str(w.message)]


@pytest.mark.parametrize("name", ["sac", "ppo"])
def test_a_run_that_ended_mid_epoch_and_is_extended_keeps_the_uninterrupted_epochs(name, tmp_path):
    """A run whose total (192 env steps) ends mid-epoch (epochs of 128): Lightning counts that epoch as done. Resumed
    from its checkpoint with a longer total (512), its epochs end at the steps and numbers of the uninterrupted
    512-step run (epoch 2 at 384, epoch 3 at 512), and it stops at the same epoch count, not one epoch later."""
    full, ends = agents(total_steps=512)[name], EpochEnds()
    trainer(tmp_path, callbacks=[ends]).fit(full)
    assert ends.epochs == [(0, 128), (1, 256), (2, 384), (3, 512)]
    short = trainer(tmp_path)
    short.fit(agents(total_steps=192)[name])
    assert short.current_epoch == 2 and short.lightning_module.env_steps == 192  # the cut epoch 1 counts as done
    short.save_checkpoint(tmp_path / "short.ckpt")
    extended, resumed = trainer(tmp_path, callbacks=[ends := EpochEnds()]), agents(total_steps=512)[name]
    extended.fit(resumed, ckpt_path=tmp_path / "short.ckpt")
    assert ends.epochs == [(2, 384), (3, 512)] and extended.current_epoch == 4 and resumed.env_steps == 512


def test_fit_learning_curve_stopped_at_the_last_step_adds_nothing_and_refuses_other_settings(tmp_path):
    """Stopped during the last step (after the final evaluation): the resumed fit trains no further (no extra
    point, env steps stay at the total); a module with other hyperparameters is refused, naming them."""
    from entreg.callbacks import fit_learning_curve

    full, _, _ = fit_learning_curve(agents()["sac"])
    folder = tmp_path / "run"
    fit_stopped("sac", folder, 256, "sigint")
    other = SACModule("InvertedPendulum-v5", learning_starts=64, batch_size=16, hidden=(8, 8), log_every=64,
                      **(COMMON | {"seed": 1}))  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 there, 1 here\)"):
        fit_learning_curve(other, folder)
    # a checkpoint from before an option existed resumes at the option's default, and only there
    checkpoint = torch.load(folder / "last.ckpt", weights_only=False)
    del checkpoint["hyper_parameters"]["temperature_entropy"]
    torch.save(checkpoint, folder / "last.ckpt")
    gaussian = SACModule("InvertedPendulum-v5", learning_starts=64, batch_size=16, hidden=(8, 8), log_every=64,
                         temperature_entropy="gaussian", **COMMON)  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(temperature_entropy: 'policy' there, 'gaussian' here\)"):
        fit_learning_curve(gaussian, folder)
    curve, _, segments = fit_learning_curve(resumed := agents()["sac"], folder)
    assert curve.points == full.points and resumed.env_steps == 256 and segments == 2
    checkpoint = {}
    other.on_save_checkpoint(checkpoint)  # an untrained agent saves too (an empty logging window)
    assert checkpoint["sac"]["window"]["stats"] == [] and checkpoint["sac"]["env_steps"] == 0


def test_learning_curve_refuses_a_module_without_evaluations(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    with pytest.raises(TypeError, match="last_evaluation"):
        trainer(tmp_path, max_steps=1, callbacks=[LearningCurve()]).fit(BoringModel())


def test_ppo_evaluates_and_ends_epochs_after_the_rollout_that_reaches_each_multiple_and_keeps_the_old_names(
    tmp_path,
):
    options = {"n_steps": 64, "batch_size": 64, "n_epochs": 1, "hidden": (8, 8), "eval_episodes": 1}
    module = PPOModule("InvertedPendulum-v5", total_steps=320, eval_every=100, **options)
    curve, ends = LearningCurve(), EpochEnds()
    trainer(tmp_path, callbacks=[curve, ends]).fit(module)
    assert [p["step"] for p in curve.points] == [128, 256, 320]  # crosses 100, 200 (and 300: at the end, 320)
    assert ends.steps == [64, 128, 192, 256, 320]  # no steps_per_epoch: a rollout per epoch
    module = PPOModule("InvertedPendulum-v5", total_steps=448, eval_every=130, steps_per_epoch=130, **options)
    curve, ends = LearningCurve(), EpochEnds()
    trainer(tmp_path, callbacks=[curve, ends]).fit(module)
    # past 130, 260, 390: epochs of 3, 2 and 2 rollouts (whole epochs of 3 would end at 192, 384, 448), each with
    # the evaluation that ranks its checkpoint
    assert ends.steps == [p["step"] for p in curve.points] == [192, 320, 448]
    with pytest.warns(DeprecationWarning) as warned:
        old = PPOModule("InvertedPendulum-v5", total_timesteps=256, rollouts_per_epoch=2, eval_every=0, **options)
    assert {str(w.message).split(" is ")[0] for w in warned} == {
        "PPOModule: total_timesteps", "PPOModule: rollouts_per_epoch",
    }  # fmt: skip
    trainer(tmp_path, callbacks=[ends := EpochEnds()]).fit(old)
    assert old.hparams.total_steps == 256 and ends.steps == [128, 256]  # epochs of 2 rollouts
    with pytest.raises(ValueError, match="not both"):
        PPOModule("InvertedPendulum-v5", n_steps=64, steps_per_epoch=128, rollouts_per_epoch=2)


def test_ppo_matched_std_starts_at_eras_initial_entropy_without_its_floor(compose_train):
    from hydra.utils import instantiate

    matched = compose_train("model=ppo_matched_std", "~backbone").model
    era = compose_train("model=ppo_era", "~backbone").model
    assert matched.init_entropy_per_dim == era.era_entropy_per_dim and matched.era_entropy_per_dim is None
    plain, floor = (instantiate(cfg, env_id="Hopper-v5", _convert_="all").policy for cfg in (matched, era))
    obs = torch.randn(16, 11)
    _, log_std = plain.policy(obs)
    _, era_log_std = floor.policy(obs)
    torch.testing.assert_close(log_std, torch.full_like(log_std, 0.5 - HALF_LOG_2PI_E))  # std 0.40
    torch.testing.assert_close(log_std, era_log_std, atol=0.02, rtol=0)  # ERA's softmax head starts near uniform
    torch.testing.assert_close(plain.entropy(log_std), floor.entropy(era_log_std))  # the same entropy: 3 x 0.5
    assert plain.log_std.requires_grad and floor.log_std is None  # a free parameter: no floor
    with pytest.raises(ValueError, match="init_entropy_per_dim"):
        PPOModule("Hopper-v5", init_entropy_per_dim=0.5, era_entropy_per_dim=0.5)


@pytest.mark.parametrize("model", RL_MODELS)
def test_env_group_composes_with_every_rl_model(model, compose_train):
    for env in ENVS:
        cfg = compose_train(f"model={model}", f"env={env}")
        env_id = OmegaConf.load(CONFIG_DIR / "env" / f"{env}.yaml").model.env_id
        assert cfg.model.env_id == env_id and cfg.get("data") is None and cfg.get("backbone") is None, env
        assert cfg.test is False and cfg.trainer.max_epochs == -1 and cfg.task_name == env
    cfg = compose_train(f"model={model}", "env=invertedpendulum", "model.hidden=[8,8]")
    from hydra.utils import instantiate

    module = instantiate(cfg.model, _convert_="all")
    assert module.hparams.total_steps == cfg.model.total_steps and module.hparams.eval_every == cfg.model.eval_every


@pytest.mark.parametrize("experiment", ["hopper_sac", "walker2d_ppo_era", "invertedpendulum_sac"])
def test_experiment_names_are_aliases_of_model_plus_env(experiment, compose_train):
    env, algo = experiment.split("_", 1)
    alias = compose_train(f"experiment={experiment}")
    direct = compose_train(f"model={algo}", f"env={env}")
    budget = {"total_steps", "steps_per_epoch", "eval_every"}  # invertedpendulum_sac keeps its shorter run
    assert {k: v for k, v in alias.model.items() if k not in budget} == {
        k: v for k, v in direct.model.items() if k not in budget
    }
    assert alias.get("data") is None and alias.test is False and alias.task_name == experiment


def test_iqm_and_its_bootstrap_interval():
    from entreg.rl.statistics import bootstrap_ci, difference_ci, iqm

    assert iqm([5.0, 1.0, 3.0]) == 3.0  # fewer than 4 seeds: the plain mean
    assert iqm([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 1000.0]) == pytest.approx(4.5)  # drops 2 per end: 3, 4, 5, 6
    values = [100.0, 120.0, 90.0, 110.0, 105.0]
    low, high = bootstrap_ci(values, seed=1)
    assert low < iqm(values) < high and (low, high) == bootstrap_ci(values, seed=1)  # seeded: repeats exactly
    assert 90.0 <= low and high <= 120.0
    narrow = bootstrap_ci(values, level=0.5, seed=1)
    assert low <= narrow[0] <= narrow[1] <= high
    assert bootstrap_ci([7.0]) == (7.0, 7.0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        bootstrap_ci(values, level=1.0)
    with pytest.raises(ValueError, match="at least one"):
        iqm([])
    better = [v + 50.0 for v in values]
    low, high = difference_ci(better, values, seed=1)
    assert 0.0 < low <= 50.0 <= high  # a clear gain: the interval excludes 0
    low, high = difference_ci([101.0, 99.0, 100.0], [100.0, 102.0, 98.0], seed=1)
    assert low < 0.0 < high  # within noise


def test_iqm_is_rliables_trimmed_mean():
    """rliable's IQM is ``scipy.stats.trim_mean(scores, proportiontocut=0.25)``: equal for every seed count."""
    from scipy.stats import trim_mean

    from entreg.rl.statistics import iqm

    rng = np.random.default_rng(0)
    for n in range(1, 13):
        values = rng.normal(size=n)
        assert iqm(values) == pytest.approx(trim_mean(values, 0.25), abs=1e-12), n


def test_difference_interval_with_few_seeds_excludes_zero_too_often_without_an_effect():
    """What the README says of 3-seed verdicts: both arms drawn from one normal distribution (no effect), the 95%
    percentile-bootstrap interval of the IQM difference excludes 0 in ~20% of 3-vs-3 comparisons (19.8% in 400
    trials with 1000 resamples), not 5%; with 10 seeds per arm it is near the nominal 5% (4.5%)."""
    from entreg.rl.statistics import difference_ci

    rng = np.random.default_rng(0)

    def false_verdicts(n: int, trials: int = 150) -> float:
        wrong = 0
        for trial in range(trials):
            low, high = difference_ci(rng.normal(size=n), rng.normal(size=n), resamples=400, seed=trial)
            wrong += not low <= 0.0 <= high
        return wrong / trials

    assert 0.12 <= false_verdicts(3) <= 0.32
    assert false_verdicts(10) <= 0.1


@pytest.mark.parametrize("env", [name for name in ENVS if name.startswith("dmc_")])
def test_dm_control_env_configs_train_the_authors_agent(env, compose_train, tmp_path):
    """Every DeepMind Control env config (extra entreg[dmc]) gives a flat observation and bounded actions, and
    model=sac_era_authors composed with it trains (a few updates) and evaluates a whole 1000-step episode."""
    pytest.importorskip("shimmy")
    from hydra.utils import instantiate

    from entreg.rl.envs import env_spaces

    cfg = compose_train("model=sac_era_authors", f"env={env}").model
    observations, actions = env_spaces(cfg.env_id)
    assert len(observations.shape) == 1 and np.isfinite(actions.low).all() and np.isfinite(actions.high).all()
    module = instantiate(
        cfg, total_steps=48, learning_starts=32, batch_size=8, hidden=[8, 8], eval_every=0, eval_episodes=1,
        _convert_="all",
    )  # fmt: skip
    trainer(tmp_path).fit(module)
    assert module.updates == 2 * (48 - 32)  # the authors' 2 updates per env step
    assert module.last_evaluation.step == 48 and np.isfinite(module.last_evaluation.mean_return)
    assert 0.0 <= module.last_evaluation.mean_return <= 1000.0  # DMC rewards are in [0, 1] per step
