"""Text-to-image GRPO (GRPOPipelineModule) against the pipeline's own sampling: per iteration and per variant, the
rollout time against the pipeline's ``__call__`` making the same number of transformer forwards, the training time
per trained transition, peak memory, and the cost counters (transformer forwards, forward+backwards, reward calls).

    python scripts/bench_grpo_pipeline.py --tiny sd3                       # tiny random pipeline: checks it runs
    python scripts/bench_grpo_pipeline.py --pipeline /models/sd3.5-medium --height 512 --steps 10 --group-size 24 \\
        --guidance 4.5 --autocast --gradient-checkpointing --write          # on a GPU
    python scripts/bench_grpo_pipeline.py --tiny sd3 --costs --steps 16 --group-size 12   # the cost table only

Timings are medians of ``--repeats`` interleaved repeats (rollout, pipeline, training in turn). ``--costs`` prints
the counters alone (deterministic: no timing). ``--write`` saves ``results/bench_grpo_pipeline.json``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import environment, quiet_libraries, results_path, write_results

from entreg.flow.variants import GRPO_VARIANTS
from entreg.modules.grpo_pipeline import GRPOPipelineModule

PROMPTS = ["a photo of a cat", "a red car on the road", "a house by a tree", "a blue dog"]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pipeline", type=Path, help="a local diffusers SD3/FLUX pipeline directory")
    where.add_argument("--tiny", choices=["sd3", "flux"], help="a tiny random pipeline built here")
    parser.add_argument("--variants", nargs="+", default=sorted(GRPO_VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--autocast", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--costs", action="store_true", help="print the cost counters only")
    parser.add_argument("--write", action="store_true", help="write results/bench_grpo_pipeline.json")
    return parser.parse_args()


def build(args: argparse.Namespace, path: Path, variant: str) -> GRPOPipelineModule:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = GRPOPipelineModule(
        str(path), lambda images, prompts: torch.zeros(len(images)), PROMPTS, height=args.height, width=args.height,
        variant=variant, steps=args.steps, group_size=args.group_size, prompts=args.prompts,
        guidance_scale=args.guidance, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
        autocast=args.autocast, gradient_checkpointing=args.gradient_checkpointing, eval_every=0,
        window_size=min(4, args.steps // 2), max_sequence_length=8 if args.tiny else 256,
    )  # fmt: skip
    module.manual_backward = lambda loss: loss.backward()  # plain calls, no Trainer: no DDP, no gradient clipping
    module.clip_gradients = lambda *args, **kwargs: None
    return module.to(device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


class PlainOptimizer:
    """A torch optimizer behind the two calls GRPOIterations makes on Lightning's optimizer wrapper."""

    def __init__(self, module: GRPOPipelineModule) -> None:
        self.optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.optimizer.step()


def iteration(module: GRPOPipelineModule, optimizer: PlainOptimizer) -> tuple[float, float, int, dict[str, int]]:
    """One GRPO iteration by hand (advantages of 1): rollout seconds, training seconds, transitions trained and the
    iteration's cost counters."""
    before = dict(module.counts)
    rollout_s, collected = timed(module._collect)
    start, trained = time.perf_counter(), 0
    for unit in collected.units:
        if unit.transitions:
            unit.advantages = torch.ones(len(unit.transitions[0].x), device=module.device)
            stats = {k: [] for k in ("clip_fraction", "approx_kl", "kl", "step_entropy")}
            module._unit_step(unit, stats, optimizer)
            trained += sum(len(tr.x) for tr in unit.transitions)
    sync()
    module.iteration += 1
    counts = {k: module.counts[k] - before[k] for k in module.counts}
    return rollout_s, time.perf_counter() - start, trained, counts


def measure(args: argparse.Namespace, module: GRPOPipelineModule) -> dict[str, float]:
    """Median seconds of one iteration's rollouts, of the pipeline making as many transformer forwards, and of
    training per transition; the iteration's cost counters."""
    optimizer, n_images = PlainOptimizer(module), args.prompts * args.group_size
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    size = {"height": args.height, "width": args.height}
    run = partial(module.pipeline, prompts, num_images_per_prompt=args.group_size, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, output_type="pt", **size)  # fmt: skip
    rollout_s, pipeline_s, train_s = [], [], []
    for repeat in range(args.repeats + 1):  # the first repeat warms up
        seconds, training, trained, counts = iteration(module, optimizer)
        calls = max(1, round(counts["sample_forwards"] / (args.steps * n_images)))
        with torch.no_grad():
            own = sum(timed(run)[0] for _ in range(calls))
        if repeat:
            rollout_s.append(seconds)
            pipeline_s.append(own * counts["sample_forwards"] / (calls * args.steps * n_images))
            train_s.append(training / max(trained, 1))
    return {
        "rollout_s": statistics.median(rollout_s),
        "pipeline_same_nfe_s": statistics.median(pipeline_s),
        "rollout_over_pipeline": statistics.median(r / p for r, p in zip(rollout_s, pipeline_s, strict=True)),
        "train_s_per_transition": statistics.median(train_s),
        **counts,
    }


def main() -> None:
    args = parse()
    quiet_libraries()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.pipeline
        if args.tiny:
            from entreg.flow.tiny_pipeline import save_tiny_pipeline

            path = save_tiny_pipeline(Path(scratch) / "tiny", args.tiny)
        rows = {}
        for variant in args.variants:
            module = build(args, path, variant)
            rows[variant] = iteration(module, PlainOptimizer(module))[3] if args.costs else measure(args, module)
            del module
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    keys = list(next(iter(rows.values())))
    print(f"{'variant':<10}" + "".join(f"{k:>24}" for k in keys))
    for variant, row in rows.items():
        print(f"{variant:<10}" + "".join(f"{row[k]:>24.4g}" for k in keys))
    print(f"peak GPU memory {peak:.2f} GiB" if peak is not None else f"peak RSS {rss:.2f} GiB (a CPU run)")
    if args.write:
        report = {**environment(settings=vars(args) | {"pipeline": str(args.pipeline)}), "rows": rows}
        report["peak_gpu_gib"], report["peak_rss_gib"] = peak, rss
        write_results(results_path(__file__), report)


if __name__ == "__main__":
    main()
