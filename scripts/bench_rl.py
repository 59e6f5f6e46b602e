"""Continuous control (MuJoCo, DeepMind Control): entreg's SAC, PPO and their ERA variants and control arms, against
Stable-Baselines3. The script composes configs, runs them and prints tables; the learning curve is the package's
(:class:`entreg.callbacks.LearningCurve`), the statistics too (:mod:`entreg.rl.statistics`).

Part ``quality``: every arm of ``--arms`` trains on every env of ``--envs`` (configs/env names such as ``hopper``, or
env ids) for ``--budget`` env steps with seeds ``--first-seed..--seeds-1`` (from 0); seeds are the outer loop, envs the
middle one and arms the inner one, so the arms alternate and a stopped run still covers every arm. Every
``--eval-every`` steps and at the end, the policy is evaluated on ``--eval-episodes`` deterministic episodes seeded
10000, 10001, ... (the same for every arm). Each finished (env, arm, seed, budget, eval period) is appended to
``results/bench_rl.json`` at once, under a file lock, and skipped when the script runs again: a benchmark resumes where
it stopped and can be spread over sessions, machines and copies of the script (``--fresh`` starts over). An unfinished
entreg run resumes too: it is checkpointed at every evaluation and, on SIGTERM or Ctrl-C, at the current step
(``--checkpoints``, default ``results/bench_rl_runs/<run>/last.ckpt``; :func:`entreg.callbacks.fit_learning_curve`), and
the same command continues it exactly where it stopped (tested equal to an uninterrupted run); its record counts the
``segments``. Copies of the script running at once must be given different runs (envs, arms or seeds, e.g. ``--seeds 1``
and ``--first-seed 1 --seeds 2``): a run in progress is not claimed.

Arms:

* entreg's, each the config ``entreg-train model=<config> env=<env>`` composes (``MODEL_CONFIGS``), with the run length
  and evaluation grid of the arguments: ``entreg_sac`` (model=sac: SB3's defaults), ``entreg_sac_era`` (model=sac_era),
  ``entreg_sac_authors`` and ``entreg_sac_era_authors`` (ERA's released agent without and with ERA),
  ``entreg_sac_authors_matched_std`` (model=sac_authors_matched_std: the agent without ERA, its std starting where ERA's
  does), ``entreg_sac_authors_matched_target`` (model=sac_authors_matched_target: that control with its temperature
  targeting ERA's entropy), ``entreg_sac_authors_matched_gaussian`` (model=sac_authors_matched_gaussian: its temperature
  holding the Gaussian's entropy, the quantity ERA sets, instead of -log pi), ``entreg_ppo`` (model=ppo: SB3's defaults
  with RL-Zoo's normalisation), ``entreg_ppo_era`` (model=ppo_era) and ``entreg_ppo_matched_std``
  (model=ppo_matched_std: plain PPO whose std starts where ERA's does, no floor). The matched arms are the controls that
  separate ERA's entropy floor from its initial noise. A suffix ``@<nats>`` sets the arm's target per action dimension
  (ERA's ``era_entropy_per_dim``, the matched arms' ``init_entropy_per_dim`` and the temperature control's
  ``target_entropy_per_dim`` too), e.g. ``entreg_ppo_era@-0.5``; ``--targets`` adds every target arm (``TARGET_ARMS``)
  once per value. Without a suffix the target is the config's.
* the baselines (``ARMS``): ``sb3_sac``: ``stable_baselines3.SAC("MlpPolicy")`` with its defaults (lr 3e-4, buffer
  1e6, batch 256, tau 0.005, gamma 0.99, learning_starts 100, one update per step, 256-256 ReLU, ent_coef "auto");
  ``sb3_ppo``: ``stable_baselines3.PPO("MlpPolicy")`` with its defaults (n_steps 2048, batch 64, 10 epochs, lr 3e-4,
  clip 0.2, GAE 0.95, 64-64 tanh, no entropy bonus) in ``VecNormalize`` (observations and rewards, clip 10);
  evaluated on normalised observations with frozen statistics.

PPO arms train in whole rollouts of 2048 steps, so their ``--budget`` and ``--eval-every`` must be multiples of
2048 (e.g. ``--budget 204800 --eval-every 20480``).

A run record holds the eval curve ``[[step, mean return], ...]``, for entreg's arms the LearningCurve points (every
episode's return, ``policy/std``, ``policy/entropy``, ``policy/gaussian_entropy`` at each evaluation), ``train_s``
(training wall time, evaluations excluded), ``updates`` and ``updates_per_s``. The first table gives per (env,
budget, eval period, arm) the final return and the area under the curve (mean eval return over the evaluation
points: it rewards learning early) as interquartile mean with a 95% percentile-bootstrap interval over seeds and as
mean ± sample std, the policy's std at the first and last evaluation, the training time, the speed (SAC: updates/s;
PPO: env steps/s, updates included) and its ratio to SB3's arm paired by seed. The second compares each ERA arm with
its controls (``CONTROLS``, same target suffix): the bootstrap interval of the IQM difference, final and AUC, and a
verdict: helps (interval above 0), hurts (below), within noise (across 0), with fewer than ``MIN_SEEDS`` seeds none.
With 3 seeds these intervals are optimistic: without any effect, a 3-vs-3 interval excludes 0 about 20% of the
time (5 seeds: 7.5%; see the README); read them with the spreads.

Part ``speed``: the two SAC implementations interleaved (ABBA) on ``--speed-env`` with the default networks,
timing ``--speed-steps`` training steps (one update each) after the 100 random warm-up steps, so start-up costs are
left out for both (Lightning's per-step loop is timed); ``--repeats`` times each, median ratio entreg/SB3. Both
parts run with ``--threads`` torch threads (default 1: on a shared 2-core machine 2-thread parallel regions stall
whenever a neighbour is busy). Part ``table`` only prints the tables of the results file, and per (env, budget)
the policy's std and entropy (nats, all dimensions) at every evaluation of every entreg arm: how much noise each
arm kept over training; part ``readme`` prints the README's table (the arms of ``ARM_NAMES`` with at least
``MIN_SEEDS`` seeds, no sweeps). Part ``ppo_envs``: whether gymnasium's vector env speeds PPO up, the env steps/s of
``entreg_ppo`` on ``--speed-env`` with ``--env-counts`` envs (1, 4, 8) at the same 2048-step rollout, interleaved,
``--repeats`` times, median ratio to the first count (more envs change the algorithm: shorter rollouts per env for
GAE; the benchmark's PPO arms keep SB3's one env). Part ``tensorboard`` writes every run's curve (return, std,
entropies) for TensorBoard to ``--logdir`` (default ``logs/bench_rl``), one run per env, budget, arm and seed.

Run:
    python scripts/bench_rl.py --envs hopper halfcheetah --budget 20000 --eval-every 5000 --seeds 3
    python scripts/bench_rl.py --envs hopper halfcheetah ant --budget 204800 --eval-every 20480 --seeds 3 \
        --arms sb3_ppo entreg_ppo entreg_ppo_era entreg_ppo_matched_std
    python scripts/bench_rl.py --envs hopper walker2d --budget 1e6 --eval-every 20480 --seeds 3 \
        --arms entreg_ppo_era entreg_ppo_matched_std --targets -1 -0.5 0 0.25       # ERA's target sweep
    python scripts/bench_rl.py --envs dmc_cheetah_run --budget 1e5 --eval-every 10000 --seeds 3 \
        --arms entreg_sac_authors entreg_sac_era_authors entreg_sac_authors_matched_std   # needs entreg[dmc]
    python scripts/bench_rl.py --part table
    python scripts/bench_rl.py --part readme    # the README's table
    python scripts/bench_rl.py --part tensorboard && tensorboard --logdir logs/bench_rl
    python scripts/bench_rl.py --part speed
    python scripts/bench_rl.py --part ppo_envs --speed-env hopper --repeats 5
    python scripts/bench_rl.py --quick          # tiny settings: checks that the script works (< ~2 minutes)

Nothing is downloaded; gymnasium[mujoco] and stable-baselines3 come with ``pip install "entreg[rl]"``, DeepMind
Control with ``pip install "entreg[dmc]"``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import functools
import json
import math
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import entreg.configs
import numpy as np
import torch
from benchkit import ForeignCpu, clean_or_all, quiet_libraries, results_path, shown

from entreg.callbacks import TrainingInterrupted
from entreg.rl.statistics import bootstrap_ci, difference_ci, iqm, verdict

CONFIG_DIR = Path(entreg.configs.__file__).parent
EVAL_SEED = 10_000
ArmFn = Callable[[str, int, int, int, int], dict[str, Any]]
ARMS: dict[str, ArmFn] = {}  # the Stable-Baselines3 baselines; entreg's arms are configs (MODEL_CONFIGS)


def register_arm(name: str) -> Callable[[ArmFn], ArmFn]:
    """Add a baseline arm ``fn(env_id, seed, budget, eval_every, eval_episodes) -> run dict`` to ``ARMS``."""

    def add(fn: ArmFn) -> ArmFn:
        ARMS[name] = fn
        return fn

    return add


def eval_points(budget: int, eval_every: int) -> list[int]:
    """Env steps at which every arm is evaluated: multiples of ``eval_every`` and the budget."""
    return sorted({*range(eval_every, budget + 1, eval_every), budget})


def mean_return(act: Callable[[torch.Tensor], torch.Tensor], env_id: str, episodes: int) -> float:
    from entreg.rl.envs import evaluate

    return float(np.mean(evaluate(act, env_id, episodes, EVAL_SEED)))


def learn_sb3(model: Any, act: Callable[[torch.Tensor], torch.Tensor], env_id: str, budget: int, eval_every: int,
              eval_episodes: int) -> tuple[list[list[float]], float]:  # fmt: skip
    """Train an SB3 model to ``budget`` steps, evaluating ``act`` at every evaluation point: (curve, train seconds,
    evaluations excluded)."""
    curve, train_s, done = [], 0.0, 0
    for point in eval_points(budget, eval_every):
        start = time.perf_counter()
        model.learn(point - done, reset_num_timesteps=done == 0)
        train_s += time.perf_counter() - start
        done = point
        curve.append([point, mean_return(act, env_id, eval_episodes)])
    return curve, train_s


def run_dict(curve: list[list[float]], train_s: float, updates: int, work: int) -> dict[str, Any]:
    """A run's record; ``updates_per_s`` is ``work / train_s`` (SAC: updates, PPO: env steps)."""
    return {"curve": curve, "train_s": train_s, "updates": updates, "updates_per_s": work / train_s}


@register_arm("sb3_sac")
def sb3_sac(env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    from stable_baselines3 import SAC

    from entreg.rl.envs import make_env

    model = SAC("MlpPolicy", make_env(env_id), seed=seed, device="cpu", verbose=0)

    def act(obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(model.predict(obs.numpy(), deterministic=True)[0])

    curve, train_s = learn_sb3(model, act, env_id, budget, eval_every, eval_episodes)
    return run_dict(curve, train_s, model._n_updates, model._n_updates)


PPO_ROLLOUT = 2048  # SB3's and PPOModule's default n_steps, one env


def check_ppo_budget(budget: int, eval_every: int, rollout: int = PPO_ROLLOUT) -> None:
    if budget % rollout or eval_every % rollout:
        raise ValueError(
            f"PPO arms train in rollouts of {rollout} steps: --budget ({budget}) and --eval-every "
            f"({eval_every}) must be multiples of {rollout}"
        )


@register_arm("sb3_ppo")
def sb3_ppo(env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from entreg.rl.envs import make_env

    check_ppo_budget(budget, eval_every)
    venv = VecNormalize(DummyVecEnv([lambda: make_env(env_id)]), gamma=0.99, clip_obs=10.0, clip_reward=10.0)
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0)

    def act(obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(model.predict(venv.normalize_obs(obs.numpy()), deterministic=True)[0])

    curve, train_s = learn_sb3(model, act, env_id, budget, eval_every, eval_episodes)
    return run_dict(curve, train_s, model._n_updates, budget)


# entreg's arms: the model config each composes (configs/model/<name>.yaml) with the env's (configs/env/)
MODEL_CONFIGS = {
    "entreg_sac": "sac",
    "entreg_sac_era": "sac_era",
    "entreg_sac_authors": "sac_authors",
    "entreg_sac_era_authors": "sac_era_authors",
    "entreg_sac_authors_matched_std": "sac_authors_matched_std",
    "entreg_sac_authors_matched_target": "sac_authors_matched_target",
    "entreg_sac_authors_matched_gaussian": "sac_authors_matched_gaussian",
    "entreg_ppo": "ppo",
    "entreg_ppo_era": "ppo_era",
    "entreg_ppo_matched_std": "ppo_matched_std",
}
# the keys that an arm's "@<nats>" suffix sets, those of its config that are set: ERA's target, or the matched
# controls' initial entropy and temperature target, per action dimension
TARGET_KEYS = ("era_entropy_per_dim", "init_entropy_per_dim", "target_entropy_per_dim")
# the arms whose config has a target (TARGET_KEYS): --targets runs them once per value
TARGET_ARMS = (
    "entreg_sac_era", "entreg_sac_era_authors", "entreg_sac_authors_matched_std", "entreg_sac_authors_matched_target",
    "entreg_sac_authors_matched_gaussian", "entreg_ppo_era", "entreg_ppo_matched_std",
)  # fmt: skip
MIN_SEEDS = 3  # per arm, for a verdict
# per ERA arm, its control arms (the same suffix): the comparisons table says whether ERA helps, hurts or is noise
CONTROLS = {
    "entreg_ppo_era": ("entreg_ppo_matched_std", "entreg_ppo"),
    "entreg_sac_era": ("entreg_sac",),
    "entreg_sac_era_authors": (
        "entreg_sac_authors_matched_std",
        "entreg_sac_authors_matched_target",
        "entreg_sac_authors_matched_gaussian",
        "entreg_sac_authors",
    ),
}
# the arms' names in the README's table (--part readme)
ARM_NAMES = {
    "sb3_sac": "SB3 SAC",
    "entreg_sac": "entreg SAC",
    "entreg_sac_era": "entreg SAC+ERA",
    "entreg_sac_authors": "ERA's SAC agent, no ERA",
    "entreg_sac_era_authors": "ERA's SAC agent + ERA",
    "entreg_sac_authors_matched_std": "ERA's SAC agent, ERA's initial std (control)",
    "entreg_sac_authors_matched_target": "ERA's SAC agent, temperature at ERA's entropy (control)",
    "entreg_sac_authors_matched_gaussian": "ERA's SAC agent, temperature at ERA's Gaussian entropy (control)",
    "sb3_ppo": "SB3 PPO",
    "entreg_ppo": "entreg PPO",
    "entreg_ppo_era": "entreg PPO+ERA",
    "entreg_ppo_matched_std": "entreg PPO std 0.40 (control)",
}


def split_arm(arm: str) -> tuple[str, float | None]:
    """``"entreg_ppo_era@-0.5"`` -> ``("entreg_ppo_era", -0.5)``; no suffix: the config's own target."""
    base, _, target = arm.partition("@")
    return base, float(target) if target else None


def env_configs() -> dict[str, str]:
    """env id -> the name of its config in configs/env/ (``"Hopper-v5"`` -> ``"hopper"``)."""
    from omegaconf import OmegaConf

    return {OmegaConf.load(path).model.env_id: path.stem for path in sorted((CONFIG_DIR / "env").glob("*.yaml"))}


def resolve_env(name: str) -> str:
    """An env given by config name (``hopper``) or id (``Hopper-v5``) -> its id (results are keyed by id)."""
    configs = env_configs()
    by_name = {stem: env_id for env_id, stem in configs.items()}
    if name in configs or name in by_name:
        return by_name.get(name, name)
    raise ValueError(f"unknown env {name!r}: configs/env/ has {sorted(by_name)} ({', '.join(configs)})")


def compose_model(arm: str, env_id: str, overrides: list[str]) -> Any:
    """The model config ``entreg-train model=<arm's config> env=<env's config> <overrides>`` would build, with the
    arm's ``@<nats>`` suffix on its target keys."""
    from hydra import compose, initialize_config_module

    base, target = split_arm(arm)
    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={MODEL_CONFIGS[base]}", f"env={env_configs()[env_id]}", *overrides])
    if target is not None:
        keys = [k for k in TARGET_KEYS if cfg.model.get(k) is not None]
        if not keys:
            raise ValueError(f"{arm}: model={MODEL_CONFIGS[base]} has no target to set ({' or '.join(TARGET_KEYS)})")
        for key in keys:
            cfg.model[key] = target
    return cfg.model


def entreg_arm(arm: str, env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int,
               checkpoints: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One run of an entreg arm: its composed config, run length and evaluation grid from the arguments, trained on
    the CPU by :func:`entreg.callbacks.fit_learning_curve`; with ``checkpoints``, resumable from the run's folder
    there (a checkpoint at every evaluation, and at the current step when the script gets SIGTERM or Ctrl-C)."""
    from hydra.utils import instantiate

    from entreg.callbacks import fit_learning_curve

    overrides = [f"seed={seed}", f"model.total_steps={budget}", f"model.steps_per_epoch={eval_every}"]
    overrides += [
        f"model.eval_every={eval_every}",
        f"model.eval_episodes={eval_episodes}",
        f"model.eval_seed={EVAL_SEED}",
    ]
    cfg = compose_model(arm, env_id, overrides)
    if "n_steps" in cfg:  # PPO: evaluations after whole rollouts, on SB3's grid
        check_ppo_budget(budget, eval_every, cfg.n_steps * cfg.num_envs)
    module = instantiate(cfg, _convert_="all")
    folder = None if checkpoints is None else checkpoints / run_name(env_id, arm, seed, budget, eval_every)
    curve, train_s, segments = fit_learning_curve(module, folder)
    work = module.updates if "n_steps" not in cfg else budget
    return run_dict(curve.curve(), train_s, module.updates, work) | {"points": curve.points, "segments": segments}


def run_name(env_id: str, arm: str, seed: int, budget: int, eval_every: int) -> str:
    """A run's checkpoint folder name, e.g. ``dm_control_cheetah-run-v0__entreg_ppo_era@-0.5__s0__204800__20480``."""
    return "__".join([env_id.replace("/", "_"), arm, f"s{seed}", str(budget), str(eval_every)])


def is_arm(arm: str) -> bool:
    return arm in ARMS or split_arm(arm)[0] in MODEL_CONFIGS


# ----------------------------------------------------------------------------------------------- results
def load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return {"runs": [], "speed": [], "ppo_envs": []} | json.loads(path.read_text())
    return {"runs": [], "speed": [], "ppo_envs": []}


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def append(path: Path, part: str, item: dict[str, Any]) -> dict[str, Any]:
    """Append ``item`` to the results file's list ``part`` (``"runs"``, ``"speed"``, ``"ppo_envs"``) under a lock,
    re-reading the file first so that copies of the script running at once keep each other's runs; returns the
    file's new contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load(path)
        results[part].append(item)
        save(path, results)
    return results


def key(run: dict[str, Any]) -> tuple[str, str, int, int, int]:
    """(env, arm, seed, budget, eval_every): runs evaluated on different grids are different runs (their AUCs
    differ), so neither replaces nor is averaged with the other."""
    return run["env"], run["arm"], run["seed"], run["budget"], eval_period(run)


def eval_period(run: dict[str, Any]) -> int:
    """A run's ``eval_every`` (older results lack the field: the step of their first evaluation)."""
    return run.get("eval_every", run["curve"][0][0])


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def algorithm(arm: str) -> str:
    """``"sac"`` or ``"ppo"``, from an arm's name (``entreg_sac_era`` -> ``"sac"``)."""
    return arm.split("_")[1]


def final_and_auc(run: dict[str, Any]) -> tuple[float, float]:
    """A run's last evaluation and the mean of all its evaluations (the area under its curve)."""
    returns = [point[1] for point in run["curve"]]
    return returns[-1], float(np.mean(returns))


def interval(values: list[float]) -> str:
    """``IQM [95% bootstrap CI]`` over seeds."""
    low, high = bootstrap_ci(values)
    return f"{iqm(values):.0f} [{low:.0f}, {high:.0f}]"


def policy_std(runs: list[dict[str, Any]]) -> str:
    """The policy's mean std at the first and the last evaluation, averaged over seeds (runs from before the
    LearningCurve callback have none)."""
    curves = [r["points"] for r in runs if r.get("points")]
    if not curves:
        return "-"
    first, last = (statistics.mean(c[i].get("policy/std", math.nan) for c in curves) for i in (0, -1))
    return f"{first:.2f} → {last:.2f}"


def grouped(runs: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, list[dict[str, Any]]]]:
    """Runs by (env, budget, eval period), then by arm."""
    groups: dict[tuple[str, int, int], dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        group = (run["env"], run["budget"], eval_period(run))
        groups.setdefault(group, {}).setdefault(run["arm"], []).append(run)
    return groups


def returns(runs: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(final returns, AUC returns) of the seeds' runs."""
    final, auc = zip(*map(final_and_auc, runs), strict=True)
    return list(final), list(auc)


def summary(runs: list[dict[str, Any]]) -> str:
    """Per (env, steps, eval period) and arm: final and AUC return as IQM [95% bootstrap CI] and mean ± std over
    seeds, the policy's std, time and speed; then, per ERA arm and control arm present, the bootstrap CI of the
    difference of IQMs and whether ERA helps (CI above 0), hurts (below) or is within noise."""
    groups = grouped(runs)
    lines = ["| env | steps | eval every | arm | seeds | final IQM [95% CI] | final mean ± std | AUC IQM [95% CI] | "
             "AUC mean ± std | policy std first → last | train s | speed | speed vs SB3 |"]  # fmt: skip
    lines.append("|---" * 13 + "|")
    comparisons = [
        "| env | steps | ERA arm | control | seeds | final: Δ IQM [95% CI] | AUC: Δ IQM [95% CI] | verdict |"
    ]
    comparisons.append("|---" * 8 + "|")
    for (env, budget, every), arms in sorted(groups.items()):
        for arm, rs in sorted(arms.items()):
            baseline = {r["seed"]: r["updates_per_s"] for r in arms.get(f"sb3_{algorithm(arm)}", [])}
            final, auc = returns(rs)
            ratios = [r["updates_per_s"] / baseline[r["seed"]] for r in rs if r["seed"] in baseline]
            ratio = f"{statistics.median(ratios):.2f}" if ratios and not arm.startswith("sb3") else "-"
            lines.append(
                f"| {env} | {budget:g} | {every:g} | {arm} | {len(rs)} | {interval(final)} | {spread(final)} | "
                f"{interval(auc)} | {spread(auc)} | {policy_std(rs)} | "
                f"{statistics.mean(r['train_s'] for r in rs):.0f} | "
                f"{statistics.mean(r['updates_per_s'] for r in rs):.1f} | {ratio} |"
            )
            base, target = split_arm(arm)
            for control in CONTROLS.get(base, ()):
                control = control if target is None or control == "entreg_ppo" else f"{control}@{target:g}"
                if control in arms:
                    comparisons.append(compare(env, budget, arm, rs, control, arms[control]))
    return "\n".join([*lines, "", *comparisons])


def readme_table(runs: list[dict[str, Any]]) -> str:
    """The README's table: per env, budget and arm without a target suffix (sweeps are in ``summary``) with at least
    ``MIN_SEEDS`` seeds, the final and AUC return as IQM [95% bootstrap CI] and mean ± std, and the policy's std."""
    lines = ["| env | env steps | arm | seeds | final IQM [95% CI] | final mean ± std | AUC IQM [95% CI] | "
             "AUC mean ± std | policy std first → last |", "|---" * 9 + "|"]  # fmt: skip
    for (env, budget, _), arms in sorted(grouped(runs).items(), key=lambda item: item[0]):
        for arm in (name for name in ARM_NAMES if len(arms.get(name, ())) >= MIN_SEEDS):
            final, auc = returns(arms[arm])
            lines.append(
                f"| {env} | {budget:,} | {ARM_NAMES[arm]} | {len(final)} | {interval(final)} | {spread(final)} | "
                f"{interval(auc)} | {spread(auc)} | {policy_std(arms[arm])} |"
            )
    return "\n".join(lines)


def noise_curves(runs: list[dict[str, Any]]) -> str:
    """Per (env, steps, eval period): the policy's std and entropy (``policy/std``, ``policy/entropy``, mean over
    seeds) at every evaluation of every entreg arm with LearningCurve points, one row per evaluation step."""
    groups: dict[tuple[str, int, int], dict[str, list[list[dict[str, Any]]]]] = {}
    for run in runs:
        if run.get("points"):
            group = (run["env"], run["budget"], eval_period(run))
            groups.setdefault(group, {}).setdefault(run["arm"], []).append(run["points"])
    blocks = []
    for (env, budget, every), arms in sorted(groups.items()):
        names = sorted(arms)
        title = f"policy std / entropy over training, {env}, {budget:g} steps, eval every {every:g} (mean over seeds)"
        lines = [title, ""]
        lines += ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        steps = sorted({point["step"] for curves in arms.values() for curve in curves for point in curve})
        for step in steps:
            cells = []
            for name in names:
                at = [p for curve in arms[name] for p in curve if p["step"] == step]
                std, entropy = (statistics.mean(p.get(tag, math.nan) for p in at) if at else math.nan
                                for tag in ("policy/std", "policy/entropy"))  # fmt: skip
                cells.append(f"{std:.2f} / {entropy:.2f}")
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def compare(env: str, budget: int, arm: str, runs: list[dict[str, Any]], control: str,
            controls: list[dict[str, Any]]) -> str:  # fmt: skip
    """A comparisons-table row: ERA arm minus control arm, final and AUC (IQM over seeds, bootstrap CI)."""
    cells, intervals = [], []
    for index in (0, 1):  # final, AUC
        ours, theirs = ([final_and_auc(r)[index] for r in rs] for rs in (runs, controls))
        low, high = difference_ci(ours, theirs)
        cells.append(f"{iqm(ours) - iqm(theirs):+.0f} [{low:+.0f}, {high:+.0f}]")
        intervals.append((low, high))
    reading = verdict(intervals, min(len(runs), len(controls)), MIN_SEEDS)
    seeds = f"{len(runs)} vs {len(controls)}"
    return f"| {env} | {budget:g} | {arm} | {control} | {seeds} | {cells[0]} | {cells[1]} | {reading} |"


def write_tensorboard(runs: list[dict[str, Any]], logdir: Path) -> int:
    """Every run's evaluations as TensorBoard scalars at their env steps: ``eval/return`` and, for entreg's arms,
    ``policy/std``, ``policy/entropy``, ``policy/gaussian_entropy``; one TensorBoard run per
    ``<env>/<budget>_every<eval period>/<arm>/seed<seed>``, so that the arms of one env overlay. Returns the count."""
    from torch.utils.tensorboard import SummaryWriter

    for run in runs:
        name = Path(run["env"].replace("/", "_"), f"{run['budget']}_every{eval_period(run)}", run["arm"])
        folder = logdir / name / f"seed{run['seed']}"
        shutil.rmtree(folder, ignore_errors=True)  # written again: one event file per run, no repeated curves
        with SummaryWriter(folder) as writer:
            for step, mean in run["curve"]:
                writer.add_scalar("eval/return", mean, step)
            for point in run.get("points", []):
                for tag in ("policy/std", "policy/entropy", "policy/gaussian_entropy"):
                    if tag in point:
                        writer.add_scalar(tag, point[tag], point["step"])
    return len(runs)


# ----------------------------------------------------------------------------------------------- speed
def sb3_steady(env_id: str, seed: int, steps: int) -> float:
    """SB3 SAC's updates/s over ``steps`` steps after its 100 warm-up steps (construction and warm-up untimed)."""
    from stable_baselines3 import SAC

    from entreg.rl.envs import make_env

    model = SAC("MlpPolicy", make_env(env_id), seed=seed, device="cpu", verbose=0)
    model.learn(100)
    before = model._n_updates
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return (model._n_updates - before) / (time.perf_counter() - start)


def entreg_steady(env_id: str, seed: int, steps: int) -> float:
    """SACModule's updates/s over ``steps`` steps after its 100 warm-up steps (Trainer start-up, warm-up and the
    final evaluation untimed; Lightning's per-step loop is timed)."""
    import lightning as L

    from entreg.modules.sac import SACModule

    class Clock(L.Callback):
        start = end = 0.0
        updates = 0

        def on_train_batch_start(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
            if module.env_steps == module.hparams.learning_starts:
                self.start, self.updates = time.perf_counter(), module.updates

        def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
            self.end = time.perf_counter()

    module = SACModule(env_id, total_steps=100 + steps, eval_every=0, eval_episodes=1, seed=seed)
    clock = Clock()
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(max_epochs=-1, enable_model_summary=False, accelerator="cpu", callbacks=[clock], **options)
    trainer.fit(module)
    return (module.updates - clock.updates) / (clock.end - clock.start - module.eval_seconds)


def interleaved(measures: dict[str, Callable[[int], float]], repeats: int) -> list[dict[str, float]]:
    """Each ``measure(repeat)`` once per repeat, in an order reversed every other repeat (ABBA), with the CPU other
    processes used during each (``<name>_foreign_cores``, NaN where unknown): one row per repeat."""
    foreign, names, rows = ForeignCpu(), list(measures), []
    for repeat in range(repeats):
        row: dict[str, float] = {}
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = foreign.snapshot()
            row[name] = measures[name](repeat)
            busy = foreign.cores(start, foreign.snapshot())
            row[f"{name}_foreign_cores"] = math.nan if busy is None else busy
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def speed(env_id: str, steps: int, repeats: int) -> list[dict[str, float]]:
    """ABBA-interleaved steady-state updates/s of SB3's and entreg's SAC (seeded by the repeat), and their ratio."""
    measures = {name: functools.partial(fn, env_id, steps=steps) for name, fn in
                (("sb3_sac", sb3_steady), ("entreg_sac", entreg_steady))}  # fmt: skip
    return [row | {"ratio": row["entreg_sac"] / row["sb3_sac"]} for row in interleaved(measures, repeats)]


def ppo_env_counts(env_id: str, counts: list[int], rollouts: int, repeats: int) -> list[dict[str, float]]:
    """PPO's env steps/s (updates included, evaluations not) with ``counts`` envs in its SyncVectorEnv at the same
    rollout of 2048 steps (``n_steps`` = 2048 / envs), ``rollouts`` rollouts a fit, :func:`interleaved`."""
    from hydra.utils import instantiate

    from entreg.callbacks import fit_learning_curve

    def steps_per_s(n: int, rollouts: int) -> float:
        steps = rollouts * PPO_ROLLOUT
        overrides = [f"model.num_envs={n}", f"model.n_steps={PPO_ROLLOUT // n}", f"model.total_steps={steps}"]
        overrides += [f"model.steps_per_epoch={steps}", f"model.eval_every={steps}", "model.eval_episodes=1"]
        module = instantiate(compose_model("entreg_ppo", env_id, ["seed=0", *overrides]), _convert_="all")
        return steps / fit_learning_curve(module)[1]

    for n in counts:  # untimed warm-up: first-use costs (imports, MuJoCo model loading) out of the timed fits
        steps_per_s(n, 1)
    return interleaved({f"envs_{n}": lambda _, n=n: steps_per_s(n, rollouts) for n in counts}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ["quality", "speed", "both", "table", "readme", "tensorboard", "ppo_envs"]
    parser.add_argument("--part", choices=parts, default="quality")
    parser.add_argument("--env-counts", nargs="+", type=int, default=[1, 4, 8], help="--part ppo_envs: envs per PPO")
    parser.add_argument("--logdir", type=Path, default=Path("logs/bench_rl"), help="--part tensorboard: where to")
    parser.add_argument("--envs", nargs="+", default=["hopper", "halfcheetah"], help="configs/env names or env ids")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["sb3_sac", "entreg_sac", "entreg_sac_era"],
        help=f"of {sorted([*ARMS, *MODEL_CONFIGS])}; entreg arms take a target suffix, e.g. entreg_ppo_era@-0.5",
    )
    parser.add_argument(
        "--targets", nargs="+", type=float, default=None,
        help="nats per action dimension: every arm with a target (ERA, matched std) runs once per value (@suffix)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=1e5, help="env steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds --first-seed..--seeds-1")
    parser.add_argument("--eval-every", type=int, default=5000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--speed-env", default="Hopper-v5")
    parser.add_argument("--speed-steps", type=int, default=1000)
    parser.add_argument("--speed-rollouts", type=int, default=4, help="--part ppo_envs: rollouts of 2048 a fit")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny settings, results to results/bench_rl_quick.json")
    parser.add_argument("--fresh", action="store_true", help="delete the results file first")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--checkpoints", type=Path, default=None,
        help="folder of the unfinished entreg runs' checkpoints (default: <results file>_runs/, e.g. "
        "results/bench_rl_runs/)",
    )  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="no checkpoints: a stopped run starts over")
    args = parser.parse_args()
    if args.quick:
        args.envs, args.budget, args.seeds, args.eval_every, args.eval_episodes = (
            ["InvertedPendulum-v5"],
            2048,
            1,
            2048,
            1,
        )
        args.speed_steps, args.repeats = 100, 2
    if args.targets is not None:
        with_target = [arm for arm in args.arms if arm in TARGET_ARMS]
        args.arms = [a for a in args.arms if a not in with_target]
        args.arms += [f"{a}@{t:g}" for t in args.targets for a in with_target]
    if not 0 <= args.first_seed < args.seeds:
        parser.error(f"--first-seed must be in [0, --seeds) = [0, {args.seeds}), got {args.first_seed}")
    unknown = [arm for arm in args.arms if not is_arm(arm)]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {sorted([*ARMS, *MODEL_CONFIGS])} (entreg arms with @<nats>)")
    try:
        envs = [resolve_env(env) for env in args.envs]
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    quiet_libraries("non-finite", "LeafSpec")
    out = args.out or results_path(__file__, "bench_rl_quick" if args.quick else None)
    checkpoints = None if args.no_resume else args.checkpoints or out.with_name(f"{out.stem}_runs")
    if args.fresh:
        out.unlink(missing_ok=True)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
    results = load(out)
    budget = int(args.budget)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.part == "table":
        print(summary(results["runs"]), noise_curves(results["runs"]), sep="\n\n")
    if args.part == "readme":
        print(readme_table(results["runs"]))
    if args.part == "tensorboard":
        count = write_tensorboard(results["runs"], args.logdir)
        print(f"{count} runs written; look at them with: tensorboard --logdir {shown(args.logdir)}")
    if args.part in ("quality", "both"):
        done = {key(r) for r in results["runs"]}
        for seed in range(args.first_seed, args.seeds):
            for env_id in envs:
                for arm in args.arms:
                    if (env_id, arm, seed, budget, args.eval_every) in done:
                        continue
                    print(f"{env_id} {arm} seed {seed} ({budget} steps)", flush=True)
                    run_arm = ARMS.get(arm) or functools.partial(entreg_arm, arm, checkpoints=checkpoints)
                    try:
                        run = run_arm(env_id, seed, budget, args.eval_every, args.eval_episodes)
                    except TrainingInterrupted as stop:
                        where = stop.ckpt_path and shown(stop.ckpt_path)
                        print(f"{stop.signal_name}: stopped, state in {where}; the same command resumes", flush=True)
                        raise SystemExit(stop.code) from None
                    run |= {"env": env_id, "arm": arm, "seed": seed, "budget": budget, "eval_every": args.eval_every}
                    run |= meta
                    print(f"  final {run['curve'][-1][1]:.1f}, {run['updates_per_s']:.1f} updates/s", flush=True)
                    results = append(out, "runs", run)
        print(summary(results["runs"]))
    if args.part in ("speed", "both"):
        rows = speed(args.speed_env, args.speed_steps, args.repeats)
        ratios = [r["ratio"] for r in rows]
        append(out, "speed", {"env": args.speed_env, "steps": args.speed_steps, "rows": rows, **meta})
        print(
            f"speed on {args.speed_env}: entreg/SB3 updates/s median {statistics.median(ratios):.3f} "
            f"(repeats {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    if args.part == "ppo_envs":
        if any(n < 1 or PPO_ROLLOUT % n for n in args.env_counts) or args.speed_rollouts < 1:
            parser.error(
                f"--env-counts must be >= 1 and divide the rollout of {PPO_ROLLOUT} steps (got {args.env_counts}), "
                f"--speed-rollouts >= 1 (got {args.speed_rollouts})"
            )
        rows = ppo_env_counts(resolve_env(args.speed_env), args.env_counts, args.speed_rollouts, args.repeats)
        busy = [any(r[f"envs_{n}_foreign_cores"] > 0.2 for n in args.env_counts) for r in rows]  # NaN: unknown
        used, noisy = clean_or_all(rows, [not b for b in busy], args.repeats)
        ratios = {n: statistics.median(r[f"envs_{n}"] / r[f"envs_{args.env_counts[0]}"] for r in used)
                  for n in args.env_counts}  # fmt: skip
        item = {"env": resolve_env(args.speed_env), "rollouts": args.speed_rollouts, "rows": rows, "ratios": ratios}
        append(out, "ppo_envs", item | {"noisy": noisy} | meta)
        print(f"PPO env steps/s vs {args.env_counts[0]} env(s), median over {len(used)} repeats"
              + (" (NOISY: other processes were busy)" if noisy else "") + ": "
              + ", ".join(f"{n} envs {r:.2f}x" for n, r in ratios.items()))  # fmt: skip
    print(f"results: {shown(out)}")


if __name__ == "__main__":
    main()
