"""Shared by the benchmark scripts: where results and caches go, CPU time taken by other processes,
quantiles, quiet logs.

On a shared 2-core machine a busy neighbour stalls every 2-thread parallel region, so the
benchmarks measure how much CPU other processes used during each repeat and leave busy
repeats out of their statistics.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"  # committed benchmark results (JSON)
CACHE = REPO / ".cache" / "bench"  # trained models and data the benchmarks reuse (git-ignored)


def results_path(script: str, name: str | None = None) -> Path:
    """``results/<name>.json``, by default named after the script (``bench_tta.py`` -> ``bench_tta.json``)."""
    return RESULTS / f"{name or Path(script).stem}.json"


def add_cache_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--cache-dir``: where one benchmark keeps what it trains, ``.cache/bench/<name>`` in the repository
    (git-ignored) by default."""
    default = CACHE / name
    parser.add_argument("--cache-dir", type=Path, default=default, help=f"trained models (default {shown(default)})")


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
