"""GRPO variants for flow models side by side at equal compute: Flow-GRPO, MixGRPO, G2RPO, E-GRPO, and E-GRPO with
our entropy option (two strengths), on the 2-D ring toy (8 modes, reward on 3) and on class-conditional 8x8 digits.

Why: E-GRPO (arXiv 2601.00423) reports its gains against other GRPO variants without compute, seeds or
diversity. A first look at this toy suggested that the early-step methods (E-GRPO, MixGRPO) climb fastest per
compute but collapse onto one of several equally rewarded modes, and that Flow-GRPO uses reward calls about 5x
better. This script measures it, and whether ``entropy_coef`` (a kernel estimate of -log p, bounded by log n,
added to the reward, i.e. maximising E[r] + lambda H) keeps E-GRPO's reward per compute with Flow-GRPO's
diversity.

How (every model and arm from the real configs, composed with ``hydra.compose`` as ``entreg-train`` and
``entreg-finetune`` would):

1. Base model: ``entreg-train experiment=ring2d_flow model.num_classes=null model.net.hidden=128
   data.n_train=8000`` for ``--base-steps`` steps (AdamW lr 1e-3, weight decay 0.01, no validation): a
   rectified-flow MLP (:class:`entreg.nn.denoisers.MLPDenoiser`, 3 residual layers of 128) trained by
   :class:`entreg.modules.flow.FlowMatchingModule` on 8 Gaussians (std 0.25) on a circle of radius 4
   (:class:`entreg.data.ring.RingDataModule`); its checkpoint is cached in ``.cache/bench/grpo/`` (git-ignored;
   ``--cache-dir``).
2. Reward: ``reward=ring_region``: :class:`entreg.flow.rewards.RegionReward`, max over modes 0-2 of
   exp(-|x - m|^2 / 0.5); evaluation metrics :class:`entreg.flow.diversity.ModeMetrics`.
3. Arms: ``grpo=flow_grpo | mixgrpo | g2rpo | egrpo | egrpo_entropy`` (``configs/grpo/``, built as
   ``GRPOModule.from_flow_checkpoint``): 16 steps, shift 3, a = 0.7, group 8, 4 groups per iteration, 8 active
   steps; MixGRPO's window of 4 moves every ``budget / (5 * 4 * cost of an iteration)`` iterations so that it
   sweeps the 8 active steps once; E-GRPO tau = 2.2; no KL; Adam instead of the configs' AdamW. Each run stops when
   its compute units (forward = 1, forward + backward = 3) reach ``--budget``
   (:class:`entreg.callbacks.ComputeBudget`, which also records the evaluations).
4. Learning rates ``--lrs`` (Adam), seeds ``--seeds``; the arm's best lr (highest final reward, mean over
   seeds) is reported, the whole grid is in the JSON.

Digits (``--task digits``): ``experiment=digits_flow``, a class-conditional flow MLP (width 256) of the 8x8 digits;
``reward=digits_classifier``: log p(class | x) of a frozen MLP classifier
(:func:`entreg.data.digits_nets.digits_classifier`); prompts are classes; the reward config's evaluation metrics
(:class:`entreg.flow.rewards.HackingGuards`): guards against reward hacking, the accuracy of a held-out CNN (other
architecture and seed) and a PCA-Gaussian log-likelihood (nats per pixel), and diversity, the mean pairwise
distance within a class (500 samples).

Metrics (ring), from 2,000 ODE samples of fixed noise, about 10 times per run and at the end: reward;
``in_target`` (fraction of samples whose nearest mode is rewarded); ``balance`` (entropy of the rewarded modes'
shares, normalised to [0, 1]: 1 = even, 0 = one mode); ``distance`` (mean distance to the nearest mode);
``path_kl`` (sum over the 16 SDE steps of the KL between the policy's and the base's transitions along the
policy's trajectories); cost counters and reward calls; wall-clock.

Run (from the repository root): ``PYTHONPATH=. python scripts/bench_grpo.py [--task digits]`` (ring: about 15
minutes on 2 cores; ``--quick``: 1 seed, 1 lr, a small budget). The digits table of the README:
``--task digits --base-steps 1500 --budget 1e5 --lrs 3e-5 1e-4``. Writes ``bench_grpo.json`` (ring) or
``bench_grpo_digits.json`` in ``results/`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from benchkit import add_cache_argument, environment, mean_std, quiet_libraries, results_path, write_results
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from entreg.callbacks import ComputeBudget
from entreg.cli import train
from entreg.modules.grpo import GRPOModule

ARMS: dict[str, list[str]] = {
    "Flow-GRPO": ["grpo=flow_grpo"],
    "MixGRPO": ["grpo=mixgrpo"],
    "G2RPO": ["grpo=g2rpo"],
    "E-GRPO": ["grpo=egrpo"],
    "E-GRPO + entropy .1": ["grpo=egrpo_entropy", "grpo.entropy_coef=0.1"],
    "E-GRPO + entropy .3": ["grpo=egrpo_entropy", "grpo.entropy_coef=0.3"],
}
# every arm: Adam, evaluations by the ComputeBudget callback only, one endless epoch
GRPO_OVERRIDES = [
    "grpo.optimizer._target_=torch.optim.Adam", "~grpo.optimizer.weight_decay", "grpo.eval_every=0",
    "grpo.iterations_per_epoch=100000",
]  # fmt: skip
# the base model's fit: no validation, no checkpoint ranking or logger, quiet; AdamW's default weight decay
BASE_OVERRIDES = [
    "model.sample_every_n_epochs=0", "model.optimizer.weight_decay=0.01", "++trainer.limit_val_batches=0",
    "trainer.max_epochs=-1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "callbacks=none", "logger=none", "test=false", "seed=0",
]  # fmt: skip


@dataclass(frozen=True)
class Task:
    """A fine-tuning problem: the configs of its base model and reward, and how it is evaluated."""

    name: str
    base: tuple[str, ...]  # overrides of the base model's train config
    reward: str  # the reward config
    eval_samples: int
    columns: tuple[str, ...]  # the metrics the summary reports


TASKS = {
    "ring": Task(
        "ring",
        ("experiment=ring2d_flow", "model.num_classes=null", "model.net.hidden=128", "data.n_train=8000"),
        "ring_region",
        2000,
        ("in_target", "balance", "distance"),
    ),
    "digits": Task(
        "digits",
        ("experiment=digits_flow", "model.feature_extractor=null"),
        "digits_classifier",
        500,
        ("held_out_accuracy", "pca_log_likelihood", "pairwise_distance"),
    ),
}


def composed(config: str, overrides: list[str]) -> Any:
    with initialize_config_module("entreg.configs", version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def base_checkpoint(task: Task, steps: int, cache: Path) -> Path:
    """``last.ckpt`` of the base model trained for ``steps`` steps (once: ``entreg-train`` of the task's config,
    its run directory kept in ``cache``)."""
    run = cache / f"{task.name}_base_{steps}"
    checkpoint = run / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        return checkpoint
    overrides = [
        *task.base, *BASE_OVERRIDES, f"++trainer.max_steps={steps}", f"paths.output_dir={run}",
        "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.last.dirpath={checkpoint.parent}", "+callbacks.last.save_last=true",
        "+callbacks.last.save_top_k=0",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        train(composed("train", overrides))
    return checkpoint


class Arms:
    """GRPO modules of the task's base checkpoint, reward and metrics for an arm's composed ``grpo`` config."""

    def __init__(self, task: Task, checkpoint: Path) -> None:
        self.task, self.checkpoint = task, checkpoint
        cfg = composed("finetune", [f"reward={task.reward}"])
        self.reward = instantiate(cfg.reward, _convert_="all")
        self.metrics = instantiate(cfg.eval_metrics, _convert_="all")  # the reward config's evaluation metrics

    def module(self, arm: str, lr: float, seed: int, **extra: Any) -> GRPOModule:
        overrides = [*ARMS[arm], *GRPO_OVERRIDES, f"grpo.optimizer.lr={lr}"]
        overrides += [f"grpo.eval_samples={self.task.eval_samples}", *(f"grpo.{k}={v}" for k, v in extra.items())]
        options = instantiate(composed("finetune", overrides).grpo, _convert_="all")
        return GRPOModule.from_flow_checkpoint(
            self.checkpoint, self.reward, eval_metrics=self.metrics, seed=seed, **options
        )


def run(module: GRPOModule, units: float, eval_every: int) -> ComputeBudget:
    """Fit ``module`` until its compute units reach ``units``; the callback holds the evaluations."""
    budget = ComputeBudget(units, eval_every)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[budget],
    )  # fmt: skip
    trainer.fit(module)
    return budget


def iteration_units(arms: Arms, arm: str) -> float:
    """Compute units of one iteration of ``arm`` (one iteration of a throw-away module)."""
    module = arms.module(arm, 1e-4, 0, **({"shift_every": 1} if arm == "MixGRPO" else {}))
    run(module, units=1.0, eval_every=0)
    return module.cost["units"]


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
    quiet_libraries("module(s) in eval mode", "`Trainer.fit` stopped")
    started = time.perf_counter()
    task = TASKS[args.task]
    grpo = Arms(task, base_checkpoint(task, args.base_steps, args.cache_dir))
    report = environment(
        benchmark=f"GRPO variants at equal compute: {task.name}",
        settings={k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        base_overrides=[*task.base, *BASE_OVERRIDES],
        arms=arms,
        grpo_overrides=GRPO_OVERRIDES,
        base=grpo.module("Flow-GRPO", 1e-4, 0).evaluate(),
    )
    print(f"base model: {report['base']}", flush=True)
    costs = {arm: iteration_units(grpo, arm) for arm in arms}
    report["iteration_units"] = costs
    runs: list[dict[str, Any]] = []
    for arm in arms:
        iterations = args.budget / costs[arm]
        extra = {"shift_every": max(1, math.ceil(iterations / 5))} if arm == "MixGRPO" else {}
        eval_every = max(1, round(iterations / 10))
        for lr in args.lrs:
            for seed in range(args.seeds):
                budget = run(grpo.module(arm, lr, seed, **extra), args.budget, eval_every)
                final = budget.history[-1]
                runs.append({"arm": arm, "lr": lr, "seed": seed, "final": final, "curve": budget.history, **extra})
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
    write_results(out, report)
    print(f"\nWrote {out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
