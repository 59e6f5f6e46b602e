"""GRPO variants for flow models side by side at equal compute: Flow-GRPO, MixGRPO, G2RPO, E-GRPO, and E-GRPO with
our entropy option (two strengths), on the 2-D ring toy (8 modes, reward on 3) and on class-conditional 8x8 digits.

Why: E-GRPO (arXiv 2601.00423) reports its gains against other GRPO variants without compute, seeds or
diversity. A first look at this toy suggested that the early-step methods (E-GRPO, MixGRPO) climb fastest per
compute but collapse onto one of several equally rewarded modes, and that Flow-GRPO uses reward calls about 5x
better. This script measures it, and whether ``entropy_coef`` (a kernel estimate of -log p, bounded by log n,
added to the reward, i.e. maximising E[r] + lambda H) keeps E-GRPO's reward per compute with Flow-GRPO's
diversity.

How:

1. Base model: a rectified-flow MLP (:class:`entreg.nn.denoisers.MLPDenoiser`, 3 residual layers of 128) trained
   by :class:`entreg.modules.flow.FlowMatchingModule` on 8 Gaussians (std 0.25) on a circle of radius 4
   (:class:`entreg.data.ring.RingDataModule`); cached in ``.cache/bench/grpo/`` (git-ignored; ``--cache-dir``).
2. Reward: :class:`entreg.flow.rewards.RegionReward`, max over modes 0-2 of exp(-|x - m|^2 / 0.5).
3. Arms (:class:`entreg.modules.grpo.GRPOModule`): 16 steps, shift 3, a = 0.7, group 8, 4 groups per iteration,
   8 active steps; MixGRPO's window of 4 moves every ``budget / (5 * 4 * cost of an iteration)`` iterations so
   that it sweeps the 8 active steps once; E-GRPO tau = 2.2; no KL. Each run stops when its compute units
   (forward = 1, forward + backward = 3) reach ``--budget``.
4. Learning rates ``--lrs`` (Adam), seeds ``--seeds``; the arm's best lr (highest final reward, mean over
   seeds) is reported, the whole grid is in the JSON.

Digits (``--task digits``): a class-conditional flow MLP (width 256) of the 8x8 digits; reward log p(class | x)
of a frozen MLP classifier (:func:`entreg.data.digits_nets.digits_classifier`); prompts are classes; guards against
reward hacking: the accuracy of a held-out CNN (other architecture and seed) and a PCA-Gaussian log-likelihood
(nats per pixel); diversity: the mean pairwise distance within a class (500 samples).

Metrics (ring), from 2,000 ODE samples of fixed noise, about 10 times per run and at the end: reward;
``in_target`` (fraction of samples whose nearest mode is rewarded); ``balance`` (entropy of the rewarded modes'
shares, normalised to [0, 1]: 1 = even, 0 = one mode); ``distance`` (mean distance to the nearest mode);
``path_kl`` (sum over the 16 SDE steps of the KL between the policy's and the base's transitions along the
policy's trajectories); cost counters and reward calls; wall-clock.

Run (from the repository root): ``PYTHONPATH=. python scripts/bench_grpo.py [--task digits]`` (ring: about 15
minutes on 2 cores; ``--quick``: 1 seed, 1 lr, a small budget). Writes ``bench_grpo.json`` (ring) or
``bench_grpo_digits.json`` in ``results/`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from benchkit import add_cache_argument, quiet_libraries, results_path
from torch import nn

from entreg.data.digits_nets import digits_classifier, digits_pca_likelihood
from entreg.data.ring import ring_centers
from entreg.flow.diversity import ModeMetrics, mean_pairwise_distance
from entreg.flow.rewards import ClassifierReward, RegionReward, held_out_accuracy
from entreg.modules.flow import FlowMatchingModule
from entreg.modules.grpo import GRPOModule
from entreg.nn.denoisers import MLPDenoiser

TARGETS = (0, 1, 2)
ARMS: dict[str, dict[str, Any]] = {
    "Flow-GRPO": {"variant": "flow_grpo"},
    "MixGRPO": {"variant": "mixgrpo"},
    "G2RPO": {"variant": "g2rpo"},
    "E-GRPO": {"variant": "egrpo", "tau": 2.2},
    "E-GRPO + entropy .1": {"variant": "egrpo", "tau": 2.2, "entropy_coef": 0.1},
    "E-GRPO + entropy .3": {"variant": "egrpo", "tau": 2.2, "entropy_coef": 0.3},
}
COMMON = {"steps": 16, "shift": 3.0, "noise_level": 0.7, "group_size": 8, "prompts": 4, "active_steps": 8}


@dataclass
class Task:
    """A fine-tuning problem: the pretrained velocity network, reward, evaluation metrics and sample layout."""

    name: str
    net: nn.Module
    reward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    metrics: Callable[[torch.Tensor, torch.Tensor | None], dict[str, float]]
    shape: tuple[int, ...]
    num_classes: int | None
    eval_samples: int
    columns: tuple[str, ...]  # the metrics the summary reports


class DigitsMetrics:
    """Reward-hacking guards and diversity of class-conditional digit samples: accuracy of a held-out CNN
    (another architecture and seed than the reward's MLP), PCA-Gaussian log-likelihood (nats per pixel) and
    the mean pairwise distance within a class."""

    def __init__(self) -> None:
        self.judge, self.pca = digits_classifier(seed=1, arch="cnn"), digits_pca_likelihood()

    def __call__(self, samples: torch.Tensor, cond: torch.Tensor | None) -> dict[str, float]:
        return {
            "held_out_accuracy": held_out_accuracy(self.judge, samples, cond),
            "pca_log_likelihood": float(self.pca.log_likelihood(samples).mean()),
            "pairwise_distance": mean_pairwise_distance(samples, cond),
        }


def pretrained(
    module: FlowMatchingModule, datamodule: L.LightningDataModule, steps: int, cache: Path, name: str
) -> nn.Module:
    """``module`` trained for ``steps`` steps on ``datamodule`` (once; its EMA weights cached in ``cache`` under
    ``name``); returns the EMA network."""
    path = cache / f"{name}_{steps}.pt"
    if path.exists():
        module.ema.load_state_dict(torch.load(path, weights_only=True))
        return module.ema.module
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(module.ema.state_dict(), path)
    return module.ema.module


def ring_task(args: argparse.Namespace) -> Task:
    from entreg.data import RingDataModule

    torch.manual_seed(0)
    module = FlowMatchingModule(MLPDenoiser(dim=2, hidden=128, layers=3), sample_every_n_epochs=0)
    data = RingDataModule(n_train=8000, batch_size=256, seed=0)
    net = pretrained(module, data, args.base_steps, args.cache_dir, "ring_base")
    reward, metrics = RegionReward(ring_centers(), TARGETS, width=0.5), ModeMetrics(ring_centers(), TARGETS)
    return Task("ring", net, reward, metrics, (2,), None, 2000, ("in_target", "balance", "distance"))


def digits_task(args: argparse.Namespace) -> Task:
    from entreg.data import DigitsDataModule

    torch.manual_seed(0)
    denoiser = MLPDenoiser(dim=64, hidden=256, layers=3, shape=(1, 8, 8), num_classes=10)
    module = FlowMatchingModule(denoiser, num_classes=10, sample_every_n_epochs=0)
    data = DigitsDataModule(size=8, scale="minus_one_one", batch_size=128)
    net = pretrained(module, data, args.base_steps, args.cache_dir, "digits_base")
    reward = ClassifierReward(digits_classifier(seed=0, arch="mlp"))
    columns = ("held_out_accuracy", "pca_log_likelihood", "pairwise_distance")
    return Task("digits", net, reward, DigitsMetrics(), (1, 8, 8), 10, 500, columns)


class Budget(L.Callback):
    """Stops training when the module's compute units reach ``units``; records the evaluations."""

    def __init__(self, units: float, eval_every: int) -> None:
        self.units, self.eval_every, self.curve = units, eval_every, []

    def _record(self, module: GRPOModule, seconds: float) -> None:
        self.curve.append({"iteration": module.iteration, **module.cost, "seconds": seconds, **module.evaluate()})

    def on_train_start(self, trainer: L.Trainer, module: GRPOModule) -> None:
        self.started = time.perf_counter()
        self._record(module, 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, module: GRPOModule, *args: Any) -> None:
        units = module.cost["units"]
        done = units >= self.units
        if done or module.iteration % self.eval_every == 0:
            self._record(module, time.perf_counter() - self.started)
        trainer.should_stop = done


def make_module(task: Task, arm: dict[str, Any], lr: float, seed: int, **extra: Any) -> GRPOModule:
    return GRPOModule(
        copy.deepcopy(task.net).requires_grad_(True), task.reward, task.shape, num_classes=task.num_classes,
        optimizer=partial(torch.optim.Adam, lr=lr), eval_every=0, eval_samples=task.eval_samples,
        eval_metrics=task.metrics, seed=seed, iterations_per_epoch=100_000, **{**COMMON, **arm, **extra},
    )  # fmt: skip


def run(module: GRPOModule, units: float, eval_every: int) -> Budget:
    budget = Budget(units, eval_every)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[budget],
    )  # fmt: skip
    trainer.fit(module)
    return budget


def iteration_units(task: Task, arm: dict[str, Any]) -> float:
    """Compute units of one iteration of ``arm`` (one iteration of a throw-away module)."""
    module = make_module(task, arm, 1e-4, 0, **({"shift_every": 1} if arm["variant"] == "mixgrpo" else {}))
    run(module, units=1.0, eval_every=10**9)
    return module.cost["units"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def reward_at(curve: list[dict[str, Any]], units: float) -> float:
    """The reward of the last evaluation at or below ``units``."""
    return [c for c in curve if c["units"] <= units][-1]["reward"]


def summarise(runs: list[dict[str, Any]], budget: float, columns: tuple[str, ...]) -> dict[str, Any]:
    """Per arm: the lr with the best mean final reward, and at it the mean and std over seeds of every metric."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            if r["arm"] == arm:
                by_lr.setdefault(r["lr"], []).append(r)
        if not by_lr:
            continue
        lr = max(by_lr, key=lambda v: statistics.mean(x["final"]["reward"] for x in by_lr[v]))
        chosen = by_lr[lr]
        row: dict[str, Any] = {"lr": lr, "seeds": len(chosen)}
        for key in ("reward", *columns, "path_kl", "reward_calls", "units", "seconds"):
            row[key] = mean_std([x["final"][key] for x in chosen])
        for fraction in (0.25, 0.5):  # reward reached at a quarter and half of the budget
            row[f"reward_at_{fraction}"] = mean_std([reward_at(x["curve"], fraction * budget) for x in chosen])
        out[arm] = row
    return out


def print_summary(task: Task, summary: dict[str, Any], budget: float) -> None:
    print(f"\n{task.name}: budget {budget:.0f} units; mean ± std over seeds at each arm's best lr")
    keys = ("reward_at_0.25", "reward_at_0.5", "reward", *task.columns, "path_kl")
    head = ("arm", "lr", "R@25%", "R@50%", "reward", *task.columns, "path-KL", "reward calls")
    print("  " + " | ".join(f"{h[:19]:>19}" if i == 0 else f"{h[:11]:>11}" for i, h in enumerate(head)))
    for arm, row in summary.items():
        cells = [f"{arm:>19}", f"{row['lr']:>11.0e}"]
        cells += [f"{row[key][0]:.3f}±{row[key][1]:.2f}"[:11].rjust(11) for key in keys]
        cells.append(f"{row['reward_calls'][0]:>11.0f}")
        print("  " + " | ".join(cells))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("ring", "digits"), default="ring")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 lr, budget 2e4")
    parser.add_argument("--budget", type=float, default=None, help="compute units per run (default 3e5)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="default 1e-4 3e-4 1e-3")
    parser.add_argument("--seeds", type=int, default=None, help="default 3")
    parser.add_argument("--arms", nargs="+", default=None, help=f"a subset of {list(ARMS)}")
    parser.add_argument("--base-steps", type=int, default=3000, help="pretraining steps of the base model")
    parser.add_argument("--threads", type=int, default=2)
    add_cache_argument(parser, "grpo")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.budget = args.budget or (2e4 if args.quick else 3e5)
    args.lrs = args.lrs or ([1e-3] if args.quick else [1e-4, 3e-4, 1e-3])
    args.seeds = args.seeds or (1 if args.quick else 3)
    arms = {name: ARMS[name] for name in (args.arms or ARMS)}
    out = args.out or results_path(__file__, "bench_grpo" if args.task == "ring" else "bench_grpo_digits")
    torch.set_num_threads(args.threads)
    quiet_libraries("module(s) in eval mode", "IterableDataset` has `__len__`")
    started = time.perf_counter()
    task = ring_task(args) if args.task == "ring" else digits_task(args)
    report: dict[str, Any] = {
        "benchmark": f"GRPO variants at equal compute: {task.name}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        "common": COMMON,
        "arms": arms,
        "base": make_module(task, ARMS["Flow-GRPO"], 1e-4, 0).evaluate(),
    }
    print(f"base model: {report['base']}", flush=True)
    costs = {arm: iteration_units(task, options) for arm, options in arms.items()}
    report["iteration_units"] = costs
    runs: list[dict[str, Any]] = []
    for arm, options in arms.items():
        iterations = args.budget / costs[arm]
        extra = {"shift_every": max(1, math.ceil(iterations / 5))} if options["variant"] == "mixgrpo" else {}
        eval_every = max(1, round(iterations / 10))
        for lr in args.lrs:
            for seed in range(args.seeds):
                budget = run(make_module(task, options, lr, seed, **extra), args.budget, eval_every)
                final = budget.curve[-1]
                runs.append({"arm": arm, "lr": lr, "seed": seed, "final": final, "curve": budget.curve, **extra})
                shown = ", ".join(f"{k} {final[k]:.3f}" for k in ("reward", *task.columns, "path_kl"))
                print(
                    f"  {arm:<19} lr {lr:.0e} seed {seed}: {shown}, {final['iteration']} iterations, "
                    f"{final['reward_calls']} reward calls, {final['seconds']:.0f} s",
                    flush=True,
                )
    report["runs"] = runs
    report["summary"] = summarise(runs, args.budget, task.columns)
    report["seconds"] = time.perf_counter() - started
    print_summary(task, report["summary"], args.budget)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nWrote {out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
