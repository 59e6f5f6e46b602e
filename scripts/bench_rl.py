"""Continuous control on MuJoCo: entreg's SAC, PPO and their ERA variants against Stable-Baselines3.

Part ``quality``: every arm of ``--arms`` trains on every env of ``--envs`` for ``--budget`` env steps with seeds
``0..--seeds-1``; seeds are the outer loop, envs the middle one and arms the inner one, so the implementations
alternate and a stopped run still covers every arm. Every ``--eval-every`` steps and at the end, the policy is
evaluated on ``--eval-episodes`` deterministic episodes seeded 10000, 10001, ... (:func:`entreg.rl.envs.evaluate`,
the same for every arm). Each finished (env, arm, seed, budget) is appended to ``results/bench_rl.json`` at once
and skipped when the script runs again, so a benchmark can span sessions (``--fresh`` starts over).

Arms (``ARMS``: name -> function(env_id, seed, budget, eval_every, eval_episodes) -> run dict):

* ``sb3_sac``: ``stable_baselines3.SAC("MlpPolicy")`` with its defaults (lr 3e-4, buffer 1e6, batch 256,
  tau 0.005, gamma 0.99, learning_starts 100, one update per step, 256-256 ReLU, ent_coef "auto");
* ``entreg_sac``: :class:`entreg.modules.sac.SACModule` with its defaults, which are SB3's;
* ``entreg_sac_era``: the same with ``era_entropy_per_dim=0.25`` (ERA's released SAC: truncated Gaussian, no
  entropy terms), everything else equal;
* ``sb3_ppo``: ``stable_baselines3.PPO("MlpPolicy")`` with its defaults (n_steps 2048, batch 64, 10 epochs,
  lr 3e-4, clip 0.2, GAE 0.95, 64-64 tanh, no entropy bonus) in ``VecNormalize`` (observations and rewards, clip
  10: RL-Zoo's ``normalize: true`` for MuJoCo); evaluated on normalised observations with frozen statistics;
* ``entreg_ppo``: :class:`entreg.modules.ppo.PPOModule` with its defaults, which are the above;
* ``entreg_ppo_era``: the same with ``era_entropy_per_dim=0.5`` (PPO+ERA: state-dependent std, no bonus).

PPO arms train in whole rollouts of 2048 steps, so their ``--budget`` and ``--eval-every`` must be multiples of
2048 (e.g. ``--budget 204800 --eval-every 20480``).

A run dict holds the eval curve ``[[step, mean return], ...]``, ``train_s`` (training wall time, evaluations
excluded), ``updates`` and ``updates_per_s``. The table gives per (env, budget, arm) the final return and the
area under the curve (mean eval return over the evaluation points, so it rewards learning early) as mean +- sample
std over seeds, the training time, the speed (SAC: updates/s; PPO: env steps/s, updates included) and its ratio to
SB3's arm of the same algorithm paired by seed. Several copies of the script may run at once on different
``--envs`` or ``--arms``: each finished run is appended to the results file under a lock.

Part ``speed``: the two SAC implementations interleaved (ABBA) on ``--speed-env`` with the default networks,
timing ``--speed-steps`` training steps (one update each) after the 100 random warm-up steps, so start-up costs are
left out for both (Lightning's per-step loop is timed); ``--repeats`` times each, median ratio entreg/SB3. Both
parts run with ``--threads`` torch threads (default 1: on a shared 2-core machine 2-thread parallel regions stall
whenever a neighbour is busy).

Run (the README's table; two copies on different envs use both cores):
    python scripts/bench_rl.py --envs Hopper-v5 HalfCheetah-v5 --budget 20000 --eval-every 5000 --seeds 3
    python scripts/bench_rl.py --envs Hopper-v5 HalfCheetah-v5 --budget 204800 --eval-every 20480 --seeds 3 \
        --arms sb3_ppo entreg_ppo entreg_ppo_era
    python scripts/bench_rl.py --part speed
    python scripts/bench_rl.py --quick          # tiny settings: checks that the script works (< ~2 minutes)

Nothing is downloaded; gymnasium[mujoco] and stable-baselines3 come with ``pip install "entreg[rl]"``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchkit import ForeignCpu, quiet_libraries, results_path, shown

EVAL_SEED = 10_000
ArmFn = Callable[[str, int, int, int, int], dict[str, Any]]
ARMS: dict[str, ArmFn] = {}


def register_arm(name: str) -> Callable[[ArmFn], ArmFn]:
    """Add an arm ``fn(env_id, seed, budget, eval_every, eval_episodes) -> run dict`` to ``ARMS``."""

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


def fit_entreg(module: Any, budget: int, eval_every: int) -> tuple[list[list[float]], float]:
    """Train an entreg module on the CPU, collecting its own evaluations (logged at the same points and seeds as
    the other arms'): (curve, train seconds, evaluations excluded)."""
    import lightning as L

    points = set(eval_points(budget, eval_every))
    curve: list[list[float]] = []

    class Curve(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
            if module.env_steps in points:
                curve.append([module.env_steps, float(trainer.callback_metrics["eval/return"])])

    trainer = L.Trainer(
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Curve()],
    )
    start = time.perf_counter()
    trainer.fit(module)
    return curve, time.perf_counter() - start - module.eval_seconds


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


def _entreg_sac(
    env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int, **kwargs: Any
) -> dict[str, Any]:
    from entreg.modules.sac import SACModule

    module = SACModule(
        env_id,
        total_steps=budget,
        eval_every=eval_every,
        eval_episodes=eval_episodes,
        eval_seed=EVAL_SEED,
        steps_per_epoch=budget,
        seed=seed,
        **kwargs,
    )
    curve, train_s = fit_entreg(module, budget, eval_every)
    return run_dict(curve, train_s, module.updates, module.updates)


@register_arm("entreg_sac")
def entreg_sac(env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    return _entreg_sac(env_id, seed, budget, eval_every, eval_episodes)


@register_arm("entreg_sac_era")
def entreg_sac_era(env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    return _entreg_sac(env_id, seed, budget, eval_every, eval_episodes, era_entropy_per_dim=0.25)


PPO_ROLLOUT = 2048  # SB3's and PPOModule's default n_steps, one env


def check_ppo_budget(budget: int, eval_every: int) -> None:
    if budget % PPO_ROLLOUT or eval_every % PPO_ROLLOUT:
        raise ValueError(
            f"PPO arms train in rollouts of {PPO_ROLLOUT} steps: --budget ({budget}) and --eval-every "
            f"({eval_every}) must be multiples of {PPO_ROLLOUT}"
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


def _entreg_ppo(
    env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int, **kwargs: Any
) -> dict[str, Any]:
    from entreg.modules.ppo import PPOModule

    check_ppo_budget(budget, eval_every)
    module = PPOModule(
        env_id,
        total_timesteps=budget,
        eval_every=eval_every // PPO_ROLLOUT,
        eval_episodes=eval_episodes,
        eval_seed=EVAL_SEED,
        seed=seed,
        **kwargs,
    )
    curve, train_s = fit_entreg(module, budget, eval_every)
    return run_dict(curve, train_s, module.updates, budget)


@register_arm("entreg_ppo")
def entreg_ppo(env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    return _entreg_ppo(env_id, seed, budget, eval_every, eval_episodes)


@register_arm("entreg_ppo_era")
def entreg_ppo_era(env_id: str, seed: int, budget: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    return _entreg_ppo(env_id, seed, budget, eval_every, eval_episodes, era_entropy_per_dim=0.5)


# ----------------------------------------------------------------------------------------------- results
def load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return {"runs": [], "speed": []} | json.loads(path.read_text())
    return {"runs": [], "speed": []}


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def append(path: Path, part: str, item: dict[str, Any]) -> dict[str, Any]:
    """Append ``item`` to the results file's list ``part`` (``"runs"`` or ``"speed"``) under an exclusive lock,
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


def summary(runs: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        group = (run["env"], run["budget"], eval_period(run))
        groups.setdefault(group, {}).setdefault(run["arm"], []).append(run)
    lines = ["| env | steps | eval every | arm | seeds | final return | AUC return | train s | speed | speed vs SB3 |"]
    lines.append("|---" * 10 + "|")
    for (env, budget, every), arms in sorted(groups.items()):
        for arm, rs in sorted(arms.items()):
            baseline = {r["seed"]: r["updates_per_s"] for r in arms.get(f"sb3_{algorithm(arm)}", [])}
            final = [r["curve"][-1][1] for r in rs]
            auc = [float(np.mean([c[1] for c in r["curve"]])) for r in rs]
            ratios = [r["updates_per_s"] / baseline[r["seed"]] for r in rs if r["seed"] in baseline]
            ratio = f"{statistics.median(ratios):.2f}" if ratios and not arm.startswith("sb3") else "-"
            lines.append(
                f"| {env} | {budget:g} | {every:g} | {arm} | {len(rs)} | {spread(final)} | {spread(auc)} | "
                f"{statistics.mean(r['train_s'] for r in rs):.0f} | "
                f"{statistics.mean(r['updates_per_s'] for r in rs):.1f} | {ratio} |"
            )
    return "\n".join(lines)


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


def speed(env_id: str, steps: int, repeats: int) -> list[dict[str, float]]:
    """ABBA-interleaved steady-state updates/s of SB3's and entreg's SAC; the CPU other processes used meanwhile."""
    foreign = ForeignCpu()
    arms = {"sb3_sac": sb3_steady, "entreg_sac": entreg_steady}
    rows = []
    for repeat in range(repeats):
        order = ["sb3_sac", "entreg_sac"] if repeat % 2 == 0 else ["entreg_sac", "sb3_sac"]
        row: dict[str, float] = {}
        for arm in order:
            start = foreign.snapshot()
            row[arm] = arms[arm](env_id, repeat, steps)
            row[f"{arm}_foreign_cores"] = foreign.cores(start, foreign.snapshot()) or math.nan
        row["ratio"] = row["entreg_sac"] / row["sb3_sac"]
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["quality", "speed", "both"], default="quality")
    parser.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"])
    parser.add_argument(
        "--arms", nargs="+", default=["sb3_sac", "entreg_sac", "entreg_sac_era"], help=f"of {sorted(ARMS)}"
    )
    parser.add_argument("--budget", type=float, default=1e5, help="env steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=5000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--speed-env", default="Hopper-v5")
    parser.add_argument("--speed-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny settings, results to results/bench_rl_quick.json")
    parser.add_argument("--fresh", action="store_true", help="delete the results file first")
    parser.add_argument("--out", type=Path, default=None)
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
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; known: {sorted(ARMS)}")
    torch.set_num_threads(args.threads)
    quiet_libraries("non-finite", "LeafSpec")
    out = args.out or results_path(__file__, "bench_rl_quick" if args.quick else None)
    if args.fresh:
        out.unlink(missing_ok=True)
    results = load(out)
    budget = int(args.budget)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.part in ("quality", "both"):
        done = {key(r) for r in results["runs"]}
        for seed in range(args.seeds):
            for env_id in args.envs:
                for arm in args.arms:
                    if (env_id, arm, seed, budget, args.eval_every) in done:
                        continue
                    print(f"{env_id} {arm} seed {seed} ({budget} steps)", flush=True)
                    run = ARMS[arm](env_id, seed, budget, args.eval_every, args.eval_episodes)
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
    print(f"results: {shown(out)}")


if __name__ == "__main__":
    main()
