"""Overhead of the ``EntropyMonitor`` callback on real Lightning training steps.

For each configuration the same LightningModule is trained with ``L.Trainer(...).fit`` in short runs
of three arms: ``off`` (no monitor), ``monitor`` (``EntropyMonitor()``) and ``features``
(``EntropyMonitor(features=...)``, which also accumulates the d x d Gram matrix of a pooled layer for
the representation entropy). Random inputs and labels, nothing downloaded:

* (a) ``ClassificationModule("small_cnn")``, 1x32x32, batch 64, features ``backbone.drop`` (the
  ``Dropout`` right after the global pool, which is not a module); needs timm and torchmetrics;
* (b) ``ClassificationModule("resnet18", cifar_stem=True)``, 3x32x32, batch 32, features
  ``backbone.avgpool``; needs torchvision and torchmetrics;
* (c) a 2-layer MLP (32 -> 128 -> 100, SGD) on batches of 256, where a fixed per-step cost is most
  visible; features: its hidden layer. Needs only torch and Lightning.

A config whose packages are missing is skipped with a note. Trainer: one epoch, no validation,
progress bar, summary or checkpoints, ``log_every_n_steps=5`` (the project's default trainer config)
and an in-memory logger (``--logger csv|tensorboard`` instead; the monitor's histograms need
TensorBoard).

Timing: one step is the time between two consecutive ``on_train_batch_start`` calls; the first
``warmup`` steps of a run are dropped. A run's value is the median of its steps on CPU; on CUDA the
device is synchronised at the two ends of the timed window only (a per-step sync would hide syncs the
callback causes) and the value is the window's mean. Each round runs the three arms once, in an order
rotated every round; the table shows medians over rounds of the run values and of the ratios
with/without, and their min and max. Rounds during which other processes used more than
``--max-foreign-cores`` CPU (``benchkit.ForeignCpu``, Linux) are kept in the JSON but left out (with
fewer than 3 clean rounds all are used and the row is marked NOISY).

Alternating steps: a shared machine drifts by more than the monitor costs, so one run per monitor arm
forwards the monitor's hooks on odd batches only; ``alt-step`` is its median monitored step over its
median unmonitored one (on CUDA synchronised every step). In these runs the monitor is a subclass whose
public hooks (``on_train_batch_start``/``_end``, ``on_train_epoch_end``) and capture callbacks
(``_on_output``, ``_on_features``) are timed, and ``EntropyStats.update`` is patched with a timer: the
breakdown gives each part's own time (nested calls taken out) per monitored step in microseconds, the
mean batch end on Lightning's logging steps (where the step value is reduced and written to the
loggers) and the epoch end. On CUDA these are host-side times: a part that blocks on the device (the
``.item()`` of a logging step) includes the wait for the step's queued kernels. ``share`` = own time / unmonitored step.

Run (``entreg`` importable: installed, or ``PYTHONPATH=.`` from the repository root):
    python scripts/bench_monitor.py                  # full, CPU, 1 thread: ~4 minutes
    python scripts/bench_monitor.py --quick          # smoke run (~1 minute)
    python scripts/bench_monitor.py --device cuda --steps 100 --warmup 10 --alt-steps 300 --rounds 7 --max-minutes 2.5

Raw per-step times, settings and versions go to ``bench_monitor.json`` in ``results/`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch
import torch.nn.functional as F
from benchkit import (
    MIN_CLEAN,
    ForeignCpu,
    clean_or_all,
    environment,
    quiet_libraries,
    results_path,
    shown,
    verdict,
    write_results,
)
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import EntropyMonitor
from entreg.callbacks.entropy_stats import EntropyStats
from entreg.loggers import should_log_step

GOAL_RATIO = 1.02
ARMS = ("off", "monitor", "features")
# the monitor's parts, timed exclusively (a nested part's time is taken out of its caller's)
PARTS = ("batch_start", "output_hook", "stats_update", "features_hook", "batch_end")


class TinyMLP(L.LightningModule):
    """Linear(32, 128) + ReLU (``hidden``) -> Linear(128, 100), cross-entropy, SGD; logs the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(32, 128), nn.ReLU())
        self.head = nn.Linear(128, 100)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _classifier(backbone: str, in_chans: int, **backbone_kwargs: Any) -> Callable[[], L.LightningModule]:
    def make() -> L.LightningModule:
        from entreg.modules import ClassificationModule

        return ClassificationModule(backbone, num_classes=10, in_chans=in_chans, backbone_kwargs=backbone_kwargs)

    return make


@dataclass(frozen=True)
class Config:
    label: str
    make_model: Callable[[], L.LightningModule]
    requires: tuple[str, ...]  # packages beyond torch and Lightning
    input_shape: tuple[int, ...]  # one sample
    num_classes: int
    batch: int
    features: str  # submodule for EntropyMonitor(features=...)
    steps: int  # timed steps per run (quick: steps // 8, at least 2)
    warmup: int  # untimed steps at the start of every run
    rounds: int  # clean rounds wanted
    alt_steps: int  # timed steps of each alternating run (half of them monitored)
    budget_weight: float  # share of the time budget


CONFIGS = {
    "a": Config(
        label="(a) small_cnn b64 1x32x32",
        make_model=_classifier("small_cnn", 1),
        requires=("timm", "torchmetrics"),
        input_shape=(1, 32, 32),
        num_classes=10,
        batch=64,
        features="backbone.drop",
        steps=30,
        warmup=3,
        rounds=7,
        alt_steps=120,
        budget_weight=0.3,
    ),
    "b": Config(
        label="(b) resnet18-cifar b32 3x32x32",
        make_model=_classifier("resnet18", 3, cifar_stem=True),
        requires=("torchvision", "torchmetrics"),
        input_shape=(3, 32, 32),
        num_classes=10,
        batch=32,
        features="backbone.avgpool",
        steps=6,
        warmup=2,
        rounds=4,
        alt_steps=16,
        budget_weight=0.55,
    ),
    "c": Config(
        label="(c) mlp 32-128-100 b256",
        make_model=TinyMLP,
        requires=(),
        input_shape=(32,),
        num_classes=100,
        batch=256,
        features="hidden",
        steps=40,
        warmup=5,
        rounds=7,
        alt_steps=300,
        budget_weight=0.15,
    ),
}


def make_loader(cfg: Config, batches: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * cfg.batch, *cfg.input_shape, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batches * cfg.batch,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=cfg.batch)


# --- timing --------------------------------------------------------------------------------------


class MemoryLogger(Logger):
    """Keeps the logged metrics in a list: a logger without files or network."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    name = "memory"  # type: ignore[assignment]
    version = 0  # type: ignore[assignment]

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({"step": step, **metrics})


def make_logger(kind: str, tmp: str) -> Logger:
    if kind == "memory":
        return MemoryLogger()
    if kind == "csv":
        return CSVLogger(save_dir=tmp, name="csv", version="")
    return TensorBoardLogger(save_dir=tmp, name="tb", version="", default_hp_metric=False)


class StepTimer(L.Callback):
    """perf_counter at every ``on_train_batch_start`` of batches warmup..warmup+steps, and the CPU other
    processes used in that window. On CUDA the device is synchronised at the window's ends (or at every
    step with ``sync_every_step``). ``timing``: whether a timed step is running."""

    def __init__(self, warmup: int, steps: int, cuda: bool, sync_every_step: bool = False) -> None:
        self.warmup, self.steps, self.cuda, self.sync_every_step = warmup, steps, cuda, sync_every_step
        self.starts: list[float] = []
        self.foreign, self._snap = ForeignCpu(), None
        self.foreign_cores: float | None = None
        self.timing = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.cuda and (self.sync_every_step or idx in (self.warmup, self.warmup + self.steps)):
            torch.cuda.synchronize()
        if idx >= self.warmup:
            self.starts.append(time.perf_counter())
        if idx == self.warmup:
            self._snap = self.foreign.snapshot()
        elif idx == self.warmup + self.steps:
            self.foreign_cores = self.foreign.cores(self._snap, self.foreign.snapshot())
        self.timing = self.warmup <= idx < self.warmup + self.steps

    def step_ms(self) -> list[float]:
        if len(self.starts) != self.steps + 1:
            raise RuntimeError(f"expected {self.steps + 1} timed batch starts, got {len(self.starts)}")
        return [(b - a) * 1e3 for a, b in zip(self.starts, self.starts[1:], strict=False)]


def fit_once(
    model: L.LightningModule,
    cfg: Config,
    monitor: L.Callback | None,
    timer: StepTimer,
    args: argparse.Namespace,
    seed: int,
) -> StepTimer:
    """One ``trainer.fit`` of warmup + steps + 1 batches (the last batch's start closes the last step)."""
    batches = timer.warmup + timer.steps + 1
    with tempfile.TemporaryDirectory(prefix="entreg_bench_monitor_") as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=make_logger(args.logger, tmp),
            log_every_n_steps=args.log_every_n_steps,
            callbacks=[timer] if monitor is None else [timer, monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp,
        )
        gc.collect()
        trainer.fit(model, train_dataloaders=make_loader(cfg, batches, seed))
    return timer


# --- the monitor's own time ----------------------------------------------------------------------


class Parts:
    """Seconds per part while ``timer.timing``, each part without the parts it calls."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.log_step_end_s: list[float] = []  # batch ends of logging steps (inclusive)
        self.epoch_end_s: float | None = None
        self._inner: list[float] = []  # time of the nested parts of each open part

    def call(self, part: str, fn: Callable[..., Any], *args: Any) -> float:
        self._inner.append(0.0)
        t0 = time.perf_counter()
        try:
            fn(*args)
        finally:
            elapsed = time.perf_counter() - t0
            inner = self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed
            if self.timer.timing:
                self.seconds[part] += elapsed - inner
        return elapsed


class TimedMonitor(EntropyMonitor):
    """EntropyMonitor whose public training hooks and capture callbacks report their time to ``parts``."""

    def __init__(self, parts: Parts, **kwargs: Any) -> None:
        self.parts, self.cuda, self.logging_step = parts, parts.timer.cuda, False
        super().__init__(**kwargs)  # the captures keep the bound _on_output/_on_features: the overrides below

    def _on_output(self, output: Tensor) -> None:
        self.parts.call("output_hook", super()._on_output, output)

    def _on_features(self, features: Tensor) -> None:
        self.parts.call("features_hook", super()._on_features, features)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.logging_step = should_log_step(trainer)
        self.parts.call("batch_start", super().on_train_batch_start, trainer, pl_module, *args)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        elapsed = self.parts.call("batch_end", super().on_train_batch_end, trainer, pl_module, *args)
        if self.logging_step and self.parts.timer.timing:
            self.parts.log_step_end_s.append(elapsed)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        if self.cuda:
            torch.cuda.synchronize()
        self.parts.epoch_end_s = time.perf_counter() - t0


class EveryOtherStep(L.Callback):
    """Forwards the training hooks to ``inner`` on odd batches only (and its setup and epoch end)."""

    def __init__(self, inner: L.Callback) -> None:
        self.inner = inner

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.inner.setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx % 2:
            self.inner.on_train_batch_start(trainer, pl_module, batch, idx)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if args[-1] % 2:  # (outputs, batch, batch_idx)
            self.inner.on_train_batch_end(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.inner.on_train_epoch_end(trainer, pl_module)


def run_alternating(
    model: L.LightningModule, cfg: Config, arm: str, warmup: int, steps: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One run whose odd batches are monitored (by a TimedMonitor) and even ones not."""
    timer = StepTimer(warmup, steps, args.device == "cuda", sync_every_step=True)
    parts = Parts(timer)
    monitor = TimedMonitor(parts, features=cfg.features if arm == "features" else None)
    original_update = EntropyStats.update

    def update(stats: EntropyStats, entropy: Tensor) -> None:
        parts.call("stats_update", original_update, stats, entropy)

    with mock.patch.object(EntropyStats, "update", update):
        fit_once(model, cfg, EveryOtherStep(monitor), timer, args, args.seed + 999)
    step_ms = timer.step_ms()
    on = [ms for i, ms in enumerate(step_ms) if (warmup + i) % 2]
    off = [ms for i, ms in enumerate(step_ms) if not (warmup + i) % 2]
    us = {part: s / len(on) * 1e6 for part, s in parts.seconds.items()}
    log_ends = parts.log_step_end_s
    return {
        "step_ms": step_ms,
        "first_step_monitored": bool(warmup % 2),
        "ms_off": statistics.median(off),
        "ms_on": statistics.median(on),
        "ratio": statistics.median(on) / statistics.median(off),
        "foreign_cores": timer.foreign_cores,
        "us_per_step": us,
        "own_us_per_step": sum(us.values()),
        "own_share": sum(us.values()) / 1e3 / statistics.median(off),
        "log_steps": len(log_ends),
        "log_step_end_us": statistics.fmean(log_ends) * 1e6 if log_ends else None,
        "epoch_end_us": None if parts.epoch_end_s is None else parts.epoch_end_s * 1e6,
    }


# --- rounds --------------------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    used, noisy = clean_or_all(rounds, [r["clean"] for r in rounds], len(rounds))
    ratios = [r["ms"][arm] / r["ms"]["off"] for r in used]
    return {
        "ms_off": statistics.median(r["ms"]["off"] for r in used),
        "ms_with": statistics.median(r["ms"][arm] for r in used),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds_used": len(used),
        "noisy": noisy,
    }


def run_config(cfg: Config, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    cuda = args.device == "cuda"
    steps = args.steps or (max(2, cfg.steps // 8) if args.quick else cfg.steps)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else cfg.warmup)
    alt_steps = 2 * ((args.alt_steps or (max(4, cfg.alt_steps // 8) if args.quick else cfg.alt_steps)) // 2)
    want = args.rounds or (2 if args.quick else cfg.rounds)
    torch.manual_seed(args.seed)
    model = cfg.make_model()
    # an untimed run first: lazy initialisation, allocator, kernels (cudnn autotuning on GPU)
    fit_once(model, cfg, EntropyMonitor(features=cfg.features), StepTimer(warmup, max(2, steps // 4), cuda), args, 0)

    alternating = {arm: run_alternating(model, cfg, arm, warmup, alt_steps, args) for arm in ARMS[1:]}
    for arm, alt in alternating.items():
        print(
            f"    alternating steps, {arm}: off {alt['ms_off']:.3f}  on {alt['ms_on']:.3f} ms  "
            f"(ratio {alt['ratio']:.4f}; own {alt['own_us_per_step']:.1f} us/step)"
            + ("" if (alt["foreign_cores"] or 0) <= args.max_foreign_cores else f"  busy: {alt['foreign_cores']:.2f}"),
            flush=True,
        )
    rounds: list[dict[str, Any]] = []
    while len(rounds) < (want if args.quick else 2 * want) and sum(r["clean"] for r in rounds) < want:
        if len(rounds) >= min(MIN_CLEAN, want) and time.perf_counter() > deadline:
            break
        i = len(rounds)
        entry: dict[str, Any] = {"order": list(ARMS[i % 3 :] + ARMS[: i % 3]), "ms": {}, "foreign_cores": {}}
        entry["step_ms"] = {}
        for arm in entry["order"]:  # the same data in every run of a round, new data every round
            monitor = None if arm == "off" else EntropyMonitor(features=cfg.features if arm == "features" else None)
            timer = fit_once(model, cfg, monitor, StepTimer(warmup, steps, cuda), args, args.seed + 1 + i)
            step_ms = timer.step_ms()
            entry["step_ms"][arm] = step_ms
            entry["ms"][arm] = statistics.fmean(step_ms) if cuda else statistics.median(step_ms)
            entry["foreign_cores"][arm] = timer.foreign_cores
        foreign = [v for v in entry["foreign_cores"].values() if v is not None]
        entry["clean"] = not foreign or max(foreign) <= args.max_foreign_cores
        rounds.append(entry)
        ms = entry["ms"]
        print(
            f"    round {i + 1}: "
            + "  ".join(f"{arm} {ms[arm]:.3f}" for arm in ARMS)
            + f" ms  (monitor/off {ms['monitor'] / ms['off']:.4f}, features/off {ms['features'] / ms['off']:.4f})"
            + ("" if entry["clean"] else f"  busy: {max(foreign):.2f} foreign cores"),
            flush=True,
        )
    return {
        "label": cfg.label,
        "batch": cfg.batch,
        "input_shape": list(cfg.input_shape),
        "features": cfg.features,
        "steps_per_run": steps,
        "warmup_steps": warmup,
        "alternating_steps": alt_steps,
        "rounds_wanted": want,
        "rounds_run": len(rounds),
        "rounds_clean": sum(r["clean"] for r in rounds),
        "summary": {arm: summarize(rounds, arm) for arm in ARMS[1:]},
        "alternating": alternating,
        "rounds": rounds,
    }


# --- report --------------------------------------------------------------------------------------


def print_results(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    stat = "window mean" if args.device == "cuda" else "median step"
    print(
        f"\nEntropyMonitor overhead per training step ({args.device}, {stat} per run, median over rounds; "
        f"logger={args.logger}, log_every_n_steps={args.log_every_n_steps})"
    )
    header = (
        f"{'config':<31} {'arm':<8} | {'off ms':>8} {'with ms':>8} | {'ratio':>6} {'[min, max]':>16} | "
        f"{'clean':>5} | {'alt-step':>8} | {'own us':>7} {'share':>6} | goal"
    )
    print(header + "\n" + "-" * len(header))
    for res in results:
        for arm in ARMS[1:]:
            s, alt = res["summary"][arm], res["alternating"][arm]
            goal = verdict(s["ratio_median"] <= GOAL_RATIO, s["noisy"])
            print(
                f"{res['label']:<31} {arm:<8} | {s['ms_off']:8.3f} {s['ms_with']:8.3f} | {s['ratio_median']:6.4f} "
                f"[{s['ratio_min']:.4f}, {s['ratio_max']:.4f}] | {res['rounds_clean']:>2}/{res['rounds_run']:<2} | "
                f"{alt['ratio']:8.4f} | {alt['own_us_per_step']:7.1f} {100 * alt['own_share']:5.2f}% | {goal}"
            )
    print(
        "ratio: median over rounds of run with / run without; alt-step: median monitored / unmonitored step of a run\n"
        "monitoring every other step; own: the monitor's instrumented time per monitored step; share: own / step."
    )

    print("\nThe monitor's own time per monitored step, microseconds (each part without the parts it calls):")
    cols = ("batch start", "output hook", "stats.update", "feat hook", "batch end")
    header = f"{'config':<31} {'arm':<8} | " + " ".join(f"{c:>12}" for c in cols)
    header += f" | {'total':>7} | {'end, log step':>13} | {'epoch end':>9}"
    print(header + "\n" + "-" * len(header))
    for res in results:
        for arm in ARMS[1:]:
            alt = res["alternating"][arm]
            log_end = "-" if alt["log_step_end_us"] is None else f"{alt['log_step_end_us']:.1f}"
            epoch = "-" if alt["epoch_end_us"] is None else f"{alt['epoch_end_us'] / 1e3:.2f} ms"
            print(
                f"{res['label']:<31} {arm:<8} | "
                + " ".join(f"{alt['us_per_step'][p]:12.1f}" for p in PARTS)
                + f" | {alt['own_us_per_step']:7.1f} | {log_end:>13} | {epoch:>9}"
            )
    print(
        "end, log step: mean batch end on Lightning's logging steps (step value reduced and written to the loggers,\n"
        "included in 'batch end'); epoch end: on_train_epoch_end once per run (statistics, spectral entropy)."
    )

    print()
    checks = (
        ("with/without", "ratio_median", GOAL_RATIO),
        ("alt-step", "ratio", GOAL_RATIO),
        ("own share", "own_share", GOAL_RATIO - 1),
    )
    for name, key, limit in checks:
        table = "summary" if key == "ratio_median" else "alternating"
        worst = {arm: max(res[table][arm][key] for res in results) for arm in ARMS[1:]}
        print(
            f"Goal {name} <= {limit:.2f}: "
            + ", ".join(f"{arm} {'PASS' if w <= limit else 'FAIL'} (worst {w:.4f})" for arm, w in worst.items())
        )
    if any(res["summary"][arm]["noisy"] for res in results for arm in ARMS[1:]):
        print("WARNING: other processes used CPU during most rounds (NOISY rows); rerun on a quiet machine.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda (accelerator='gpu')")
    add("--quick", action="store_true", help="few steps and 2 rounds: checks that the script works")
    add("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS), help="rows (default: all)")
    add("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on CPU)")
    add("--steps", type=int, default=None, help="timed steps per run (default: per config)")
    add("--warmup", type=int, default=None, help="untimed steps per run (default: per config)")
    add("--alt-steps", type=int, default=None, help="timed steps of the alternating runs (default: per config)")
    add("--rounds", type=int, default=None, help="clean rounds per config (default: per config, at most 2x run)")
    add("--max-minutes", type=float, default=None, help="time budget, rounds stop at it (default 4; quick 1)")
    add("--max-foreign-cores", type=float, default=0.3, help="CPU other processes may use in a clean round")
    add("--logger", choices=("memory", "csv", "tensorboard"), default="memory", help="trainer logger")
    add("--log-every-n-steps", type=int, default=5, help="Trainer log_every_n_steps")
    add("--seed", type=int, default=0, help="seed of the models and data")
    add("--verbose", action="store_true", help="keep Lightning's info logs and warnings")
    add("--out", type=Path, default=results_path(__file__), help="JSON output path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    for name, low in (("threads", 1), ("steps", 2), ("rounds", 1), ("alt_steps", 4), ("warmup", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if not args.verbose:
        quiet_libraries("smaller than the logging interval", "no `val_")
    max_minutes = args.max_minutes if args.max_minutes is not None else (1.0 if args.quick else 4.0)
    configs = []
    for key in sorted(set(args.configs)):
        missing = [m for m in CONFIGS[key].requires if importlib.util.find_spec(m) is None]
        if missing:
            print(f"skipping {CONFIGS[key].label}: {', '.join(missing)} not installed")
        else:
            configs.append(CONFIGS[key])
    if not configs:
        parser.error("no config can run")

    report = environment(
        benchmark="EntropyMonitor overhead on Lightning training steps (with/without, interleaved)",
        lightning=L.__version__,
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        settings={k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"max_minutes": max_minutes, "goal_ratio": GOAL_RATIO},
    )
    print(
        f"bench_monitor: torch {torch.__version__}, lightning {L.__version__}, {report['device']}, "
        f"{torch.get_num_threads()} threads, quick={args.quick}"
    )
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for i, cfg in enumerate(configs):
        # the budget in proportion to the configs' weights, what earlier configs left over included
        left = max_minutes * 60 - (time.perf_counter() - started)
        deadline = time.perf_counter() + left * cfg.budget_weight / sum(c.budget_weight for c in configs[i:])
        print(f"\n{cfg.label}: features={cfg.features!r}", flush=True)
        results.append(run_config(cfg, args, deadline))
    report["results"] = results
    report["seconds_total"] = time.perf_counter() - started
    print_results(results, args)
    write_results(args.out, report)
    print(f"\nWrote {args.out} ({report['seconds_total']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
