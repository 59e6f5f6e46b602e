"""Overhead of the ``EntropyMonitor`` callback on real Lightning training steps.

For each configuration the same LightningModule is trained with ``L.Trainer(...).fit`` in short
runs of three arms:

* ``off``: no monitor,
* ``monitor``: ``EntropyMonitor()`` (predictive entropy of the module's forward, logged every step),
* ``features``: ``EntropyMonitor(features=...)``, which also accumulates the representation
  entropy (a d x d float64 Gram matrix per batch) of a pooled layer.

Configurations (random inputs and labels, fixed across runs; nothing is downloaded):

* (a) ``ClassificationModule("small_cnn", num_classes=10, in_chans=1)``, 1x32x32, batch 64;
  features: ``backbone.drop`` (small_cnn pools with ``x.mean((2, 3))``, not a module: the
  ``Dropout(0.0)`` right after it is the first module that sees the pooled (N, 128) features);
* (b) the same with ``backbone="resnet18"``, ``backbone_kwargs={"cifar_stem": True}``, 3x32x32,
  batch 32; features: ``backbone.avgpool`` (N, 512, 1, 1);
* (c) a 2-layer MLP (32 -> 128 -> 100 classes, SGD) on (256, 32) inputs, where a fixed per-step
  cost is most visible; features: its hidden layer ``hidden`` (Linear + ReLU, (N, 128)).

The modules, optimizer and every run's data are shared by the arms, so the arms differ only in the
callback. Trainer: ``max_epochs=1``, ``limit_val_batches=0``, ``num_sanity_val_steps=0``, no
progress bar, model summary or checkpointing, ``log_every_n_steps=5`` (the project's
``configs/trainer/default.yaml``), and an in-memory logger by default (``--logger``: ``csv`` or
``tensorboard`` instead; the monitor's training histograms need TensorBoard, so they are off with
the default logger and at the default 50-step period with ``tensorboard``).

Timing: a callback records ``time.perf_counter()`` at every ``on_train_batch_start``; one step is
the time between two consecutive calls (data fetch, forward, loss, backward, optimizer step and all
callbacks' hooks). The first ``warmup`` steps of each run are dropped, and the run's value is the
median of its timed steps. On CUDA (``--device cuda``) steps run asynchronously, so the device is
synchronised at the start and the end of the timed window only and the run's value is the window's
mean time per step: per-step synchronisation would hide host-device syncs the callback itself
causes. Interleaving: each round runs the three arms once each, in an order rotated every round,
and gives the ratios monitor/off and features/off of that round; the table shows the median over
rounds of the run values and of the ratios, with the min and max ratio. Goal: ratio <= 1.02
(and, below, alternating-step ratio <= 1.02 and the monitor's own time <= 2% of a step).

Shared machines: as in ``bench_era.py``, the CPU used by other processes during every timed window
is measured (``benchkit.ForeignCpu``, Linux only); a round where it exceeded
``--max-foreign-cores`` in any arm is kept in the JSON but left out of the statistics, and extra
rounds are run (up to ``--max-rounds`` per config and each config's share of the time budget). With
fewer than 3 clean rounds all rounds are used and the row is marked NOISY.

Alternating steps: a machine whose speed drifts by more than the monitor costs (a busy neighbour
on a shared 2-core machine) blurs ratios of whole runs, so after the rounds one run per monitor arm
attaches the monitor through a wrapper that forwards its hooks on odd batches only: adjacent steps
form pairs one step apart, and the ``alt-step`` column is the median monitored step over
the median unmonitored one of that run (``alt_steps`` timed steps; on CUDA synchronised every step).
On a shared 2-core VM whole runs were seen to settle in a fast or a slow mode (up to ~30% apart,
with no other process busy), which the run-level ratios cannot separate from a 2% effect.

Breakdown: in the ``features`` alternating run the monitor's methods are wrapped with timers, which
gives its own cost per monitored step in microseconds: attaching the hooks (batch start), the
output hook (entropy + running statistics), the features hook (Gram matrix), and the batch end
(detaching the hooks, and ``_log_train_step``: the strategy reduce of the step mean and the
``pl_module.log`` call), plus the per-epoch cost of ``on_train_epoch_end`` (spectral entropy).
The ``monitor`` arm's own cost is that total minus the features hook. On CUDA these are host-side
times (a blocking sync shows up where the host waits). ``share`` = own cost / unmonitored step.

Run:
    python scripts/bench_monitor.py                  # full, CPU, 1 thread: ~5-6 minutes on 2 cores
    python scripts/bench_monitor.py --quick          # smoke run (~1 minute)
    python scripts/bench_monitor.py --device cuda    # on a GPU (accelerator="gpu")
    python scripts/bench_monitor.py --configs c      # only the MLP

``entreg`` must be importable (installed, or ``PYTHONPATH=.`` from the repository root). Raw per-step
times, settings, versions and date go to ``bench_monitor.json`` next to this script
(``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from benchkit import ForeignCpu, quantile
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

GOAL_RATIO = 1.02
ARMS: tuple[str, ...] = ("off", "monitor", "features")
MIN_CLEAN = 3
LOG_EVERY_N_STEPS = 5


# ----------------------------------------------------------------------------------------------
# Models, data and configurations
# ----------------------------------------------------------------------------------------------


class TinyMLP(L.LightningModule):
    """Linear(32, 128) + ReLU (``hidden``) -> Linear(128, 100) (``head``), cross-entropy, SGD; logs the loss."""

    def __init__(self, in_features: int = 32, hidden: int = 128, num_classes: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    make_model: Callable[[], L.LightningModule]
    input_shape: tuple[int, ...]  # one sample
    num_classes: int
    batch: int
    features: str  # submodule for EntropyMonitor(features=...)
    steps: int  # timed steps per run
    warmup: int  # untimed steps at the start of every run
    rounds: int  # clean rounds wanted
    alt_steps: int  # timed steps of each alternating run (half of them monitored)
    budget_weight: float  # share of the time budget
    quick_steps: int = 4
    quick_warmup: int = 1
    quick_alt_steps: int = 8


def _classifier(backbone: str, in_chans: int, **backbone_kwargs: Any) -> Callable[[], L.LightningModule]:
    def make() -> L.LightningModule:
        from entreg.modules import ClassificationModule

        return ClassificationModule(backbone, num_classes=10, in_chans=in_chans, backbone_kwargs=backbone_kwargs)

    return make


CONFIGS: dict[str, Config] = {
    "a": Config(
        key="a",
        label="(a) small_cnn b64 1x32x32",
        make_model=_classifier("small_cnn", 1),
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
        key="b",
        label="(b) resnet18-cifar b32 3x32x32",
        make_model=_classifier("resnet18", 3, cifar_stem=True),
        input_shape=(3, 32, 32),
        num_classes=10,
        batch=32,
        features="backbone.avgpool",
        steps=6,
        warmup=2,
        rounds=4,
        alt_steps=16,
        budget_weight=0.55,
        quick_steps=2,
        quick_alt_steps=4,
    ),
    "c": Config(
        key="c",
        label="(c) mlp 32-128-100 b256",
        make_model=TinyMLP,
        input_shape=(32,),
        num_classes=100,
        batch=256,
        features="hidden",
        steps=40,
        warmup=5,
        rounds=7,
        alt_steps=300,
        budget_weight=0.15,
        quick_steps=10,
        quick_warmup=2,
        quick_alt_steps=20,
    ),
}


def make_loader(cfg: Config, batches: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    n = batches * cfg.batch
    x = torch.randn(n, *cfg.input_shape, generator=gen)
    y = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=cfg.batch, shuffle=False, num_workers=0)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class MemoryLogger(Logger):
    """Keeps the logged metrics in a list: a logger without files or network."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({"step": step, **metrics})


class StepTimer(L.Callback):
    """perf_counter at every ``on_train_batch_start``; the timed window is batches warmup..warmup+steps.

    On CUDA the device is synchronised at the window's two ends only, or at every step with
    ``sync_every_step``. ``timing`` is true while a timed step runs (the breakdown's wrappers count
    only then).
    """

    def __init__(self, warmup: int, steps: int, cuda: bool, sync_every_step: bool = False) -> None:
        self.warmup, self.steps, self.cuda, self.sync_every_step = warmup, steps, cuda, sync_every_step
        self.starts: list[float] = []
        self.foreign = ForeignCpu()
        self._snap_start: tuple[int, int, float] | None = None
        self.foreign_cores: float | None = None
        self.timing = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        edge = batch_idx in (self.warmup, self.warmup + self.steps)
        if self.cuda and (edge or self.sync_every_step):
            torch.cuda.synchronize()
        now = time.perf_counter()
        if batch_idx >= self.warmup:
            self.starts.append(now)
        if batch_idx == self.warmup:
            self._snap_start = self.foreign.snapshot()
        elif batch_idx == self.warmup + self.steps:
            self.foreign_cores = self.foreign.cores(self._snap_start, self.foreign.snapshot())
        self.timing = self.warmup <= batch_idx < self.warmup + self.steps

    def step_ms(self) -> list[float]:
        if len(self.starts) != self.steps + 1:
            raise RuntimeError(f"expected {self.steps + 1} timed batch starts, got {len(self.starts)}")
        return [(b - a) * 1e3 for a, b in zip(self.starts, self.starts[1:], strict=False)]


def make_logger(kind: str, tmp: str) -> Logger:
    if kind == "memory":
        return MemoryLogger()
    if kind == "csv":
        return CSVLogger(save_dir=tmp, name="csv", version="")
    return TensorBoardLogger(save_dir=tmp, name="tb", version="", default_hp_metric=False)


def make_monitor(arm: str, cfg: Config) -> L.Callback | None:
    from entreg.callbacks import EntropyMonitor

    if arm == "off":
        return None
    return EntropyMonitor(features=cfg.features if arm == "features" else None)


class EveryOtherStep(L.Callback):
    """Forwards the training hooks to ``inner`` on odd batches only (and its setup and epoch end)."""

    def __init__(self, inner: L.Callback) -> None:
        self.inner = inner

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.inner.setup(trainer, pl_module, stage)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % 2:
            self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % 2:
            self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.inner.on_train_epoch_end(trainer, pl_module)


def fit_once(
    model: L.LightningModule,
    cfg: Config,
    monitor: L.Callback | None,
    warmup: int,
    steps: int,
    args: argparse.Namespace,
    seed: int,
    timer: StepTimer | None = None,
) -> StepTimer:
    cuda = args.device == "cuda"
    timer = timer or StepTimer(warmup, steps, cuda)
    callbacks: list[L.Callback] = [timer] if monitor is None else [timer, monitor]
    batches = warmup + steps + 1  # the last batch's start closes the last timed step
    loader = make_loader(cfg, batches, seed)
    with tempfile.TemporaryDirectory(prefix="entreg_bench_monitor_") as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=make_logger(args.logger, tmp),
            log_every_n_steps=args.log_every_n_steps,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp,
        )
        gc.collect()
        trainer.fit(model, train_dataloaders=loader)
    return timer


def run_value(step_ms: list[float], cuda: bool) -> float:
    """A run's ms per step: median of its steps (CPU) or the window mean (CUDA, synchronised at the ends)."""
    return statistics.fmean(step_ms) if cuda else statistics.median(step_ms)


# ----------------------------------------------------------------------------------------------
# Breakdown of the monitor's own cost
# ----------------------------------------------------------------------------------------------

PARTS: tuple[str, ...] = (
    "attach",
    "output_hook",
    "features_hook",
    "batch_end",
    "log_train_step",
    "reduced_mean",
    "pl_log",
)


class Breakdown:
    """Wraps an EntropyMonitor's methods with timers (summed seconds while ``timer.timing``)."""

    def __init__(self, monitor: Any, pl_module: L.LightningModule, timer: StepTimer, cuda: bool) -> None:
        self.timer, self.cuda = timer, cuda
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.epoch_end_s: float | None = None
        self._in_log_step = False
        self._stats_wrapped: Any = None
        m = monitor
        m.on_train_batch_start = self._wrap(m.on_train_batch_start, "attach", after=self._wrap_stats(m))
        m._capture.on_output = self._wrap(m._capture.on_output, "output_hook")
        if m._feature_capture is not None:
            m._feature_capture.on_output = self._wrap(m._feature_capture.on_output, "features_hook")
        m.on_train_batch_end = self._wrap(m.on_train_batch_end, "batch_end")
        m._log_train_step = self._wrap(m._log_train_step, "log_train_step", flag=True)
        original_log = pl_module.log

        def log(*a: Any, **k: Any) -> Any:
            if not self._in_log_step:
                return original_log(*a, **k)
            t0 = time.perf_counter()
            try:
                return original_log(*a, **k)
            finally:
                self._add("pl_log", time.perf_counter() - t0)

        pl_module.log = log  # type: ignore[method-assign]
        original_epoch_end = m.on_train_epoch_end

        def epoch_end(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original_epoch_end(*a, **k)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.epoch_end_s = time.perf_counter() - t0

        m.on_train_epoch_end = epoch_end

    def _add(self, part: str, seconds: float) -> None:
        if self.timer.timing:
            self.seconds[part] += seconds

    def _wrap_stats(self, monitor: Any) -> Callable[[], None]:
        def wrap() -> None:  # _step_stats is made in setup(): wrap it once it exists
            stats = monitor._step_stats
            if stats is None or stats is self._stats_wrapped:
                return
            stats.reduced_mean = self._wrap(stats.reduced_mean, "reduced_mean")
            self._stats_wrapped = stats

        return wrap

    def _wrap(
        self, fn: Callable[..., Any], part: str, flag: bool = False, after: Callable[[], None] | None = None
    ) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            if flag:
                self._in_log_step = True
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._add(part, time.perf_counter() - t0)
                if flag:
                    self._in_log_step = False
                if after is not None:
                    after()

        return wrapped


def run_alternating(
    model: L.LightningModule,
    cfg: Config,
    arm: str,
    warmup: int,
    steps: int,
    args: argparse.Namespace,
    seed: int,
    instrument: bool,
) -> dict[str, Any]:
    """One run whose odd batches are monitored and even ones not: adjacent steps form pairs, so slow
    drifts of the machine's speed cancel. With ``instrument``, the monitor's methods are timed too."""
    monitor = make_monitor(arm, cfg)
    cuda = args.device == "cuda"
    timer = StepTimer(warmup, steps, cuda, sync_every_step=True)
    breakdown = Breakdown(monitor, model, timer, cuda) if instrument else None
    try:
        fit_once(model, cfg, EveryOtherStep(monitor), warmup, steps, args, seed, timer)
    finally:
        if instrument:
            del model.log  # the instance attribute set by Breakdown: back to the class's method
    step_ms = timer.step_ms()
    on = [ms for i, ms in enumerate(step_ms) if (warmup + i) % 2]
    off = [ms for i, ms in enumerate(step_ms) if not (warmup + i) % 2]
    pairs = [b / a for a, b in zip(step_ms[::2], step_ms[1::2], strict=False)]  # (first, second) of each pair
    if warmup % 2:  # the first timed step is monitored: pairs are (on, off)
        pairs = [1 / r for r in pairs]
    out: dict[str, Any] = {
        "arm": arm,
        "step_ms": step_ms,
        "first_step_monitored": bool(warmup % 2),
        "ms_off": statistics.median(off),
        "ms_on": statistics.median(on),
        "ratio": statistics.median(on) / statistics.median(off),
        "pair_ratio_median": statistics.median(pairs),
        "pair_ratio_iqr": [quantile(pairs, 0.25), quantile(pairs, 0.75)],
        "foreign_cores": timer.foreign_cores,
    }
    if breakdown is not None:
        us = {part: sec / len(on) * 1e6 for part, sec in breakdown.seconds.items()}
        # parts that contain others: the remainder is the rest of the method (hook removal, bookkeeping)
        us["batch_end_rest"] = us["batch_end"] - us["log_train_step"]
        us["log_train_step_rest"] = us["log_train_step"] - us["reduced_mean"] - us["pl_log"]
        total = us["attach"] + us["output_hook"] + us["features_hook"] + us["batch_end"]
        out["breakdown"] = {
            "us_per_step": us,
            "total_us_per_step": total,
            "without_features_us_per_step": total - us["features_hook"],
            "epoch_end_us": None if breakdown.epoch_end_s is None else breakdown.epoch_end_s * 1e6,
        }
    return out


# ----------------------------------------------------------------------------------------------
# Rounds
# ----------------------------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    clean = [r for r in rounds if r["clean"]]
    used = clean if len(clean) >= min(MIN_CLEAN, len(rounds)) else rounds
    ratios = [r["ms"][arm] / r["ms"]["off"] for r in used]
    mean_ratios = [r["mean_ms"][arm] / r["mean_ms"]["off"] for r in used]
    return {
        "ms_off": statistics.median(r["ms"]["off"] for r in used),
        "ms_with": statistics.median(r["ms"][arm] for r in used),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_iqr": [quantile(ratios, 0.25), quantile(ratios, 0.75)],
        "ratio_of_means_median": statistics.median(mean_ratios),
        "rounds_used": len(used),
        "noisy": used is rounds and len(clean) < len(rounds),
    }


def run_config(cfg: Config, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    cuda = args.device == "cuda"
    steps = args.steps or (cfg.quick_steps if args.quick else cfg.steps)
    warmup = args.warmup if args.warmup is not None else (cfg.quick_warmup if args.quick else cfg.warmup)
    want = args.rounds or (2 if args.quick else cfg.rounds)
    max_rounds = args.max_rounds or (want if args.quick else 2 * want)
    torch.manual_seed(args.seed)
    model = cfg.make_model()
    # one untimed run first: lazy initialisation, allocator, kernels (cudnn autotuning on GPU)
    fit_once(model, cfg, make_monitor("features", cfg), warmup, max(2, steps // 4), args, args.seed)

    rounds: list[dict[str, Any]] = []
    while len(rounds) < max_rounds and sum(r["clean"] for r in rounds) < want:
        if len(rounds) >= min(MIN_CLEAN, want) and time.perf_counter() > deadline:
            break
        i = len(rounds)
        order = ARMS[i % len(ARMS) :] + ARMS[: i % len(ARMS)]
        entry: dict[str, Any] = {"order": list(order), "ms": {}, "mean_ms": {}, "foreign_cores": {}, "step_ms": {}}
        for arm in order:
            # the same data in every run of a round; a new batch sequence every round
            timer = fit_once(model, cfg, make_monitor(arm, cfg), warmup, steps, args, args.seed + 1 + i)
            step_ms = timer.step_ms()
            entry["step_ms"][arm] = step_ms
            entry["ms"][arm] = run_value(step_ms, cuda)
            entry["mean_ms"][arm] = statistics.fmean(step_ms)
            entry["foreign_cores"][arm] = timer.foreign_cores
        foreign = [v for v in entry["foreign_cores"].values() if v is not None]
        entry["clean"] = not foreign or max(foreign) <= args.max_foreign_cores
        rounds.append(entry)
        print(
            f"    round {i + 1}: "
            + "  ".join(f"{arm} {entry['ms'][arm]:.3f}" for arm in ARMS)
            + f" ms  (monitor/off {entry['ms']['monitor'] / entry['ms']['off']:.4f}, "
            f"features/off {entry['ms']['features'] / entry['ms']['off']:.4f})"
            + ("" if entry["clean"] else f"  busy: {max(foreign):.2f} foreign cores"),
            flush=True,
        )
    alt_steps = 2 * ((args.alt_steps or (cfg.quick_alt_steps if args.quick else cfg.alt_steps)) // 2)
    alternating = {
        arm: run_alternating(model, cfg, arm, warmup, alt_steps, args, args.seed + 999, instrument=arm == "features")
        for arm in ARMS[1:]
    }
    for arm, alt in alternating.items():
        print(
            f"    alternating steps, {arm}: off {alt['ms_off']:.3f}  on {alt['ms_on']:.3f} ms  "
            f"(ratio {alt['ratio']:.4f}, pair ratios median {alt['pair_ratio_median']:.4f})",
            flush=True,
        )
    breakdown = alternating["features"]["breakdown"]
    summary = {arm: summarize(rounds, arm) for arm in ARMS[1:]}
    for arm in ARMS[1:]:
        own = breakdown["total_us_per_step"] if arm == "features" else breakdown["without_features_us_per_step"]
        summary[arm]["alt_step_ratio"] = alternating[arm]["ratio"]
        summary[arm]["own_us_per_step"] = own
        summary[arm]["own_share"] = own / 1e3 / alternating["features"]["ms_off"]
    return {
        "config": cfg.key,
        "label": cfg.label,
        "batch": cfg.batch,
        "input_shape": list(cfg.input_shape),
        "num_classes": cfg.num_classes,
        "features": cfg.features,
        "steps_per_run": steps,
        "warmup_steps": warmup,
        "alternating_steps": alt_steps,
        "rounds_wanted": want,
        "rounds_run": len(rounds),
        "rounds_clean": sum(r["clean"] for r in rounds),
        "summary": summary,
        "alternating": alternating,
        "breakdown": breakdown,
        "rounds": rounds,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def print_results(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    stat = "window mean" if args.device == "cuda" else "median step"
    print(
        f"\nEntropyMonitor overhead per training step ({args.device}, {stat} per run, median over rounds; "
        f"logger={args.logger}, log_every_n_steps={args.log_every_n_steps})"
    )
    header = (
        f"{'config':<31} {'monitor':<9} | {'off ms':>9} {'with ms':>9} | {'ratio':>7} {'[min, max]':>17} | "
        f"{'clean':>5} | {'alt-step':>8} | {'own us/step':>11} {'share':>7} | goal"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        for arm in ARMS[1:]:
            s = res["summary"][arm]
            own, alt, share = s["own_us_per_step"], s["alt_step_ratio"], s["own_share"]
            verdict = ("PASS" if s["ratio_median"] <= GOAL_RATIO else "FAIL") + (" NOISY" if s["noisy"] else "")
            clean = f"{res['rounds_clean']}/{res['rounds_run']}"
            print(
                f"{res['label']:<31} {arm:<9} | {s['ms_off']:9.3f} {s['ms_with']:9.3f} | {s['ratio_median']:7.4f} "
                f"[{s['ratio_min']:6.4f}, {s['ratio_max']:6.4f}] | {clean:>5} | {alt:8.4f} | "
                f"{own:11.1f} {100 * share:6.2f}% | {verdict}"
            )
    print(
        "ratio: median over rounds of (run with monitor / run without); alt-step: one run monitoring every other "
        "step,\nmedian monitored / median unmonitored step; own: the monitor's own time per monitored step "
        "(instrumented;\n'monitor' = features run minus its features hook), share = own / unmonitored step."
    )
    print("\nBreakdown of the monitor's own time (features arm, instrumented alternating run), microseconds per step:")
    cols = (
        ("attach", "attach"),
        ("output_hook", "out hook"),
        ("features_hook", "feat hook"),
        ("batch_end_rest", "detach+"),
        ("reduced_mean", "reduce"),
        ("pl_log", "pl.log"),
        ("log_train_step_rest", "log rest"),
    )
    header = f"{'config':<31} | " + " ".join(f"{label:>9}" for _, label in cols) + f" | {'total':>8} | epoch end"
    print(header)
    print("-" * len(header))
    for res in results:
        bd = res["breakdown"]
        cells = " ".join(f"{bd['us_per_step'][key]:9.1f}" for key, _ in cols)
        epoch = "-" if bd["epoch_end_us"] is None else f"{bd['epoch_end_us'] / 1e3:.2f} ms"
        print(f"{res['label']:<31} | {cells} | {bd['total_us_per_step']:8.1f} | {epoch}")
    worst = max(res["summary"][arm]["ratio_median"] for res in results for arm in ARMS[1:])
    ok = all(res["summary"]["monitor"]["ratio_median"] <= GOAL_RATIO for res in results)
    ok_features = all(res["summary"]["features"]["ratio_median"] <= GOAL_RATIO for res in results)
    print(
        f"\nGoal: with/without <= {GOAL_RATIO}: monitor {'PASS' if ok else 'FAIL'}, monitor+features "
        f"{'PASS' if ok_features else 'FAIL'} (worst median {worst:.4f})"
    )
    checks = (("alt-step ratio", "alt_step_ratio", GOAL_RATIO), ("own share", "own_share", GOAL_RATIO - 1))
    for column, key, limit in checks:
        ok_arm = {arm: all(res["summary"][arm][key] <= limit for res in results) for arm in ARMS[1:]}
        worst_arm = max(res["summary"][arm][key] for res in results for arm in ARMS[1:])
        print(
            f"{column} <= {limit:.2f}: monitor {'PASS' if ok_arm['monitor'] else 'FAIL'}, "
            f"monitor+features {'PASS' if ok_arm['features'] else 'FAIL'} (worst {worst_arm:.4f})"
        )
    if any(res["summary"][arm]["noisy"] for res in results for arm in ARMS[1:]):
        print("WARNING: other processes used CPU during most rounds (NOISY rows); rerun on a quiet machine.")


def quiet_libraries() -> None:
    """Silence Lightning's info logs and the warnings that short runs on random data trigger."""
    for name in list(logging.root.manager.loggerDict):
        if name == "lightning" or name.startswith(("lightning.", "lightning_fabric", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*but have no `val_dataloader`.*")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="few steps and 2 rounds: checks that the script works")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS), help="rows")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per config)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default: per config)")
    parser.add_argument(
        "--alt-steps", type=int, default=None, help="timed steps of the alternating runs (default: per config)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="clean rounds per config (default: 7; b 5)")
    parser.add_argument("--max-rounds", type=int, default=None, help="at most this many rounds (default 2x)")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="time budget of all rounds (default 4.5; quick 1)"
    )
    parser.add_argument(
        "--max-foreign-cores",
        type=float,
        default=0.3,
        help="a round is clean if other processes used at most this many cores in each run (default 0.3)",
    )
    parser.add_argument("--logger", choices=("memory", "csv", "tensorboard"), default="memory", help="trainer logger")
    parser.add_argument("--log-every-n-steps", type=int, default=LOG_EVERY_N_STEPS, help="Trainer log_every_n_steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and data")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's info logs and warnings")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"), help="JSON output path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    for name in ("threads", "steps", "rounds", "max_rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.alt_steps is not None and args.alt_steps < 2:
        parser.error("--alt-steps must be >= 2")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        torch.set_num_threads(1)
    if not args.verbose:
        quiet_libraries()
    max_minutes = args.max_minutes if args.max_minutes is not None else (1.0 if args.quick else 4.5)
    configs = [CONFIGS[key] for key in sorted(set(args.configs))]

    report: dict[str, Any] = {
        "benchmark": "EntropyMonitor overhead on Lightning training steps (with/without, interleaved)",
        "command": "python scripts/bench_monitor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "settings": {
            "quick": args.quick,
            "logger": args.logger,
            "tensorboard_histograms": "every 50 steps (monitor default)" if args.logger == "tensorboard" else "off",
            "log_every_n_steps": args.log_every_n_steps,
            "run_value": "window mean (synchronised at its ends)" if args.device == "cuda" else "median step",
            "max_minutes": max_minutes,
            "max_foreign_cores": args.max_foreign_cores,
            "seed": args.seed,
            "goal_ratio": GOAL_RATIO,
        },
    }
    print(
        f"bench_monitor: torch {torch.__version__}, lightning {L.__version__}, {args.device}, "
        f"{torch.get_num_threads()} threads, quick={args.quick}"
    )
    started = time.perf_counter()
    results = []
    for cfg in configs:
        # the time budget in proportion to the configs' weights, what an earlier config left over included
        left = max_minutes * 60 - (time.perf_counter() - started)
        remaining = sum(c.budget_weight for c in configs[len(results) :])
        deadline = time.perf_counter() + left * cfg.budget_weight / remaining
        print(f"\n{cfg.label}: monitor features={cfg.features!r}", flush=True)
        results.append(run_config(cfg, args, deadline))
    report["results"] = results
    report["seconds_total"] = time.perf_counter() - started
    print_results(results, args)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {args.out} ({report['seconds_total']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
