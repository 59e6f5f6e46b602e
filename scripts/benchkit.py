"""Shared by the benchmark scripts: where results and caches go, the run's environment, CPU time taken by other
processes and the choice of clean repeats, statistics (mean ± std, quantiles, the median's confidence interval),
tables over NFE, quiet logs.

On a shared 2-core machine a busy neighbour stalls every 2-thread parallel region, so the
benchmarks measure how much CPU other processes used during each repeat and leave busy
repeats out of their statistics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"  # committed benchmark results (JSON)
CACHE = REPO / ".cache" / "bench"  # trained models and data the benchmarks reuse (git-ignored)
MIN_CLEAN = 3  # fewer clean repeats than this: statistics over all repeats, marked NOISY

T = TypeVar("T")


def results_path(script: str, name: str | None = None) -> Path:
    """``results/<name>.json``, by default named after the script (``bench_tta.py`` -> ``bench_tta.json``)."""
    return RESULTS / f"{name or Path(script).stem}.json"


def add_cache_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--cache-dir``: where one benchmark keeps what it trains, ``.cache/bench/<name>`` in the repository
    (git-ignored) by default."""
    default = CACHE / name
    parser.add_argument("--cache-dir", type=Path, default=default, help=f"trained models (default {shown(default)})")


def write_results(path: Path, report: dict[str, Any], keep: Sequence[str] = ()) -> None:
    """Write ``report`` as JSON to ``path``. ``keep``: the parts of a benchmark (keys of ``report``) that this run did
    not produce; an existing file's are carried over (with their ``settings[part]``, if any), and ``kept`` records
    the date and command of the run that produced each of them."""
    if keep and path.is_file():
        old = json.loads(path.read_text())
        kept = {}
        for part in keep:
            if part in old:
                report[part] = old[part]
                kept[part] = old.get("kept", {}).get(part, {key: old.get(key) for key in ("date", "command")})
                if part in old.get("settings", {}):
                    report.setdefault("settings", {})[part] = old["settings"][part]
        if kept:
            report["kept"] = kept
    path.write_text(json.dumps(report, indent=1, default=float) + "\n")


def shown(path: Path) -> str:
    """``path`` as recorded in results: relative to the repository when inside it, so no result names a
    folder of the machine it ran on."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


class ForeignCpu:
    """CPU time used by other processes, in cores, between two snapshots (Linux /proc; None elsewhere)."""

    def __init__(self) -> None:
        self.available = Path("/proc/stat").is_file() and Path("/proc/self/stat").is_file()
        self.hz = os.sysconf("SC_CLK_TCK") if self.available else 100

    def snapshot(self) -> tuple[int, int, float] | None:
        """(busy jiffies of the whole machine, jiffies of this process, perf_counter)."""
        if not self.available:
            return None
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # user nice system [idle iowait] irq softirq steal
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12]), time.perf_counter()  # utime + stime, all threads

    def cores(self, start: tuple[int, int, float] | None, end: tuple[int, int, float] | None) -> float | None:
        if start is None or end is None or end[2] <= start[2]:
            return None
        return ((end[0] - start[0]) - (end[1] - start[1])) / self.hz / (end[2] - start[2])


def environment(**extra: Any) -> dict[str, Any]:
    """The header of a results file: date (UTC), command line (the script relative to the repository), torch and
    Python versions, platform, processor, CPU count and torch threads, then ``extra``."""
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", shown(Path(sys.argv[0])), *sys.argv[1:]]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **extra,
    }


def clean_or_all(repeats: Sequence[T], clean: Sequence[bool], wanted: int = MIN_CLEAN) -> tuple[list[T], bool]:
    """The repeats to take statistics over: the clean ones when there are at least ``min(wanted, MIN_CLEAN)``,
    else all of them; and whether that fallback left busy repeats in (the row is NOISY)."""
    kept = [r for r, ok in zip(repeats, clean, strict=True) if ok]
    if len(kept) >= min(wanted, MIN_CLEAN):
        return kept, False
    return list(repeats), len(kept) < len(repeats)


def interleaved_step_times(
    schedulers: dict[str, Callable[[], Any]],
    noise: Any,
    outputs: Sequence[Any],
    repeats: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Time per ``scheduler.step`` of two schedulers side by side: ``schedulers`` maps a name to a factory returning
    a scheduler with its timesteps set (one per entry of ``outputs``, the model outputs fed to its steps, from
    ``noise``). Every repeat steps each scheduler through the whole grid once, in an order reversed every other
    repeat, and measures the CPU other processes used meanwhile (:class:`ForeignCpu`; clean below 0.2 cores);
    ``sync`` waits for an accelerator around the timed loop. Returns the median milliseconds per step of each
    over the clean repeats (:func:`clean_or_all`) and the median and range of the first's time over the second's."""
    names = list(schedulers)
    foreign, times, clean = ForeignCpu(), [], []
    for repeat in range(repeats):
        here, start = {}, foreign.snapshot()
        for name in names if repeat % 2 == 0 else names[::-1]:
            scheduler, x = schedulers[name](), noise
            sync()
            t0 = time.perf_counter()
            for t, output in zip(scheduler.timesteps, outputs, strict=True):
                x = scheduler.step(output, t, x).prev_sample
            sync()
            here[name] = (time.perf_counter() - t0) / len(outputs)
        busy = foreign.cores(start, foreign.snapshot())
        times.append(here)
        clean.append(busy is None or busy < 0.2)
    used, noisy = clean_or_all(times, clean, repeats)
    ratios = [r[names[0]] / r[names[1]] for r in used]
    return {
        "ms_per_step": {name: 1e3 * statistics.median(r[name] for r in used) for name in names},
        "ratio_median": statistics.median(ratios),
        "ratio_min_max": (min(ratios), max(ratios)),
        "clean_repeats": sum(clean),
        "noisy": noisy,
    }


def run_parts(
    args: argparse.Namespace,
    benchmark: str,
    parts: dict[str, tuple[str, Callable[[argparse.Namespace], Any]]],
    show: Callable[[dict[str, Any]], None] = lambda report: None,
) -> dict[str, Any]:
    """Run the part ``args.part`` names (``"both"``: every part, in order) of a benchmark whose ``parts`` map a name
    to (what it prints while running, the function of ``args`` giving its results); the report (:func:`environment`
    with the settings, each part's results, ``seconds``) is passed to ``show`` and written to ``args.out`` keeping
    the parts not run from the file."""
    report = environment(benchmark=benchmark, settings={k: v for k, v in vars(args).items() if k != "out"})
    started = time.perf_counter()
    chosen = list(parts) if args.part == "both" else [args.part]
    for name in chosen:
        message, run = parts[name]
        print(f"{message} ...", flush=True)
        report[name] = run(args)
    report["seconds"] = time.perf_counter() - started
    show(report)
    write_results(args.out, report, keep=[name for name in parts if name not in chosen])
    print(f"\nWrote {args.out} ({report['seconds']:.0f} s)")
    return report


def verdict(ok: bool, noisy: bool) -> str:
    """``PASS``/``FAIL`` of a goal, with `` NOISY`` when busy repeats entered the statistics."""
    return ("PASS" if ok else "FAIL") + (" NOISY" if noisy else "")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics (sign test).

    With fewer values than the level needs (n < 6 for 95%) it is the full range, which then covers less.
    """
    s, n = sorted(values), len(values)
    k, cumulative = 0, 0.0
    for j in range(n + 1):  # largest k with P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2
        cumulative += math.comb(n, j) / 2**n
        if cumulative > (1.0 - level) / 2:
            break
        k = j + 1
    return (s[0], s[-1]) if k == 0 else (s[k - 1], s[n - k])


def print_nfe_table(label: str, runs: Sequence[dict[str, dict[str, float]]], metric: str, nfes: Sequence[int]) -> None:
    """One metric of sampler runs keyed ``"solver|grid|nfe"`` (one dict per seed): a row per solver and grid, the
    mean over seeds per NFE and the std over seeds at NFE 10."""
    print(f"\n  {label} (mean over seeds; ± the std at NFE 10)")
    print(f"  {'sampler':<9} {'grid':<8} | " + " ".join(f"{n:>7}" for n in nfes) + " | ±(10)")
    for row in dict.fromkeys(key.rsplit("|", 1)[0] for key in runs[0]):
        values = [mean_std([seed[f"{row}|{n}"][metric] for seed in runs]) for n in nfes]
        spread = dict(zip(nfes, values, strict=True)).get(10, (0.0, 0.0))[1]
        sampler, grid = row.split("|")
        print(f"  {sampler:<9} {grid:<8} | " + " ".join(f"{v[0]:7.4f}" for v in values) + f" | {spread:.4f}")


class LoopTimer:
    """Seconds per call of ``fn()``, timed over loops of ``n`` calls: ``n`` is calibrated (after one untimed call)
    so that a loop lasts at least ``min_loop_s`` with a 1.2x margin, and lengthened whenever a loop was shorter
    (e.g. when it was calibrated during a slow phase of a shared machine). ``last_n``: the calls of the last loop."""

    def __init__(self, fn: Callable[[], Any], min_loop_s: float) -> None:
        self.fn, self.min_loop_s = fn, min_loop_s
        fn()  # first call: allocations, lazy initialisation
        self.n = 1
        while (per_call := self._loop(self.n)) * self.n < min_loop_s:
            self.n = max(2 * self.n, math.ceil(1.2 * min_loop_s / max(per_call, 1e-9)))
        self.last_n = self.n

    def _loop(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.fn()
        return (time.perf_counter() - start) / n

    def measure(self) -> float:
        """Seconds per call over one loop of ``n`` calls."""
        self.last_n = self.n
        per_call = self._loop(self.n)
        if per_call * self.n < self.min_loop_s:
            self.n = math.ceil(1.2 * self.min_loop_s / per_call)
        return per_call


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def quiet_libraries(*messages: str) -> None:
    """Silence Lightning's info logs, two known harmless warnings and any warning containing one of
    ``messages`` (the tables stay readable)."""
    import lightning  # noqa: F401  (its import sets its loggers to INFO: import first, then lower them)

    for name in list(logging.root.manager.loggerDict):
        if name == "lightning" or name.startswith(("lightning.", "lightning_fabric", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.WARNING)
    for message in ("does not have many workers", "isinstance(treespec, LeafSpec)", *messages):
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}.*")
