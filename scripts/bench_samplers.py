"""Diffusion samplers side by side on exactly known Gaussian mixtures: EVODiff against diffusers' solvers.

Why exact mixtures: under the VP schedule the denoiser of a Gaussian mixture is known in closed form at
every noise level (:class:`entreg.diffusion.gmm.GaussianMixture`), so the samplers are compared with
no training and no network error, on the ODE they all discretise.

Data: a 2-D mixture (8 components, rank-1 plus isotropic covariances) and a 64-D one (10 components,
rank 4), float64, ``GaussianMixture.random(dim, components, rank, seed=0)``. Noise schedule: diffusers'
default VP schedule (1000 steps, linear betas 1e-4 to 0.02). The model is the exact epsilon-prediction
at the noise level of its timestep: the log-sigma table of the 1000 training steps interpolated linearly
in the (possibly non-integer) timestep, which is what diffusers' ``_sigma_to_t`` inverts, so integer
timesteps are exact and every scheduler sees one and the same model. On the logSNR grid diffusers'
multistep schedulers round their timesteps to integers, so the model sees a level slightly off the one
the solver assumes, as a real network would (under 1% of the RMSE in a check).

Reference solution: DPM-Solver++(2M) (our scheduler with its EVODiff coefficients neutral) on a uniform
logSNR grid of ``--ref-steps`` points from the largest to the smallest training noise level, then the
data prediction, in float64, from the same initial noise; its convergence is checked by halving its
steps (the difference is reported).

Samplers, every one at 1 model evaluation per timestep (NFE = number of timesteps), each on two grids:
``trailing`` (``timestep_spacing="trailing"``) and ``logSNR`` (``use_exponential_sigmas=True``: uniform
in log sigma, i.e. in logSNR for VP; DDIM has no such option and runs on ``trailing`` only):

* ``EVODiff``: :class:`entreg.diffusion.EVODiffScheduler` (defaults; at NFE <= 20 identical to the
  reference's rule); ``EVODiff-f``: the same with ``final_step="dpmsolver"``, i.e. without the
  reference's last step, whose shrink factor ``1 - sqrt(s_t s_0)`` depends on the absolute noise level
  (made for its EDM grid ending at 0.002; on diffusers' trailing grid it ends at ~0.3 and shrinks by ~0.6);
* ``DPM++2M``, ``DPM++3M``: ``DPMSolverMultistepScheduler(solver_order=2|3)``;
* ``UniPC``: ``UniPCMultistepScheduler`` (bh2, its default);
* ``DEIS``: ``DEISMultistepScheduler``;
* ``DDIM``: ``DDIMScheduler(clip_sample=False)`` (its default clips x0 to [-1, 1], which is wrong for
  these data); ``Euler``: ``EulerDiscreteScheduler``.

Metrics, mean ± std over ``--seeds`` seeds (each seed: new initial noise and new true samples):
RMSE per coordinate to the reference solution from the same noise; sliced Wasserstein-2 distance
(``--projections`` random directions) to fresh true samples, next to its floor (true vs true samples);
mean log-likelihood under the mixture, next to that of true samples (higher than the truth means
over-sharpened samples, which the distances can miss).

Cost: the time of ``scheduler.step`` alone (precomputed model outputs), per step, EVODiff over
DPM++2M, on image batches (64, 3, 32, 32) and latents (4, 4, 64, 64), float32, 20 steps, medians of
``--repeats`` repeats; a repeat counts when other processes used under 0.2 cores. Next to it, one
forward of a small ``UNet2DModel`` (channels 64-128-128) on the same batch.

Run (from the repository root):
    PYTHONPATH=. python scripts/bench_samplers.py           # ~5 minutes on 2 cores
    PYTHONPATH=. python scripts/bench_samplers.py --quick   # < 1 minute

Writes ``bench_samplers.json`` in ``results/`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchkit import ForeignCpu, results_path
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from torch import Tensor

from entreg.diffusion.evodiff import EVODiffScheduler
from entreg.diffusion.gmm import GaussianMixture
from entreg.diffusion.metrics import sliced_wasserstein

NFES = (5, 6, 8, 10, 15, 20)
MIXTURES = {"2-D": (2, 8, 1), "64-D": (64, 10, 4)}  # dim, components, rank
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "EVODiff": (EVODiffScheduler, {}),
    "EVODiff-f": (EVODiffScheduler, {"final_step": "dpmsolver"}),
    "DPM++2M": (DPMSolverMultistepScheduler, {"solver_order": 2}),
    "DPM++3M": (DPMSolverMultistepScheduler, {"solver_order": 3}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
    "DDIM": (DDIMScheduler, {"clip_sample": False}),
    "Euler": (EulerDiscreteScheduler, {}),
}
GRIDS = {"trailing": {"timestep_spacing": "trailing"}, "logSNR": {"use_exponential_sigmas": True}}
LOGSNR_OK = {"EVODiff", "EVODiff-f", "DPM++2M", "DPM++3M", "UniPC", "DEIS", "Euler"}


def exact_model(mixture: GaussianMixture, log_sigmas: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """epsilon(x, t) of ``mixture`` at timestep ``t`` (log sigma interpolated linearly between training steps)."""
    steps = torch.arange(len(log_sigmas), dtype=torch.float64)

    def model(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(1)
        kappa = float(torch.from_numpy(np.interp(t.numpy(), steps.numpy(), log_sigmas.numpy())).exp())
        alpha = 1.0 / math.sqrt(1.0 + kappa * kappa)
        sigma = kappa * alpha
        x64 = x.double()
        x0 = mixture.posterior_mean(x64, alpha, sigma)
        return ((x64 - alpha * x0) / sigma).to(x.dtype)

    return model


def run_sampler(scheduler, model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, nfe: int) -> tuple[Tensor, int]:
    """Sample from ``noise`` with ``nfe`` timesteps; returns the samples and the model calls made."""
    scheduler.set_timesteps(nfe)
    x, calls = noise * scheduler.init_noise_sigma, 0
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        calls += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, calls


def reference(model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int) -> Tensor:
    """DPM-Solver++(2M) on ``steps`` uniform-logSNR levels from the largest to the smallest training level, then x0."""
    scheduler = EVODiffScheduler(balance=False, adaptive_ratio=False, corrector=False, final_step="dpmsolver")
    kappas = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    grid = torch.exp(torch.linspace(math.log(kappas[-1]), math.log(kappas[0]), steps, dtype=torch.float64))
    scheduler.set_timesteps(sigmas=torch.cat([grid, torch.zeros(1, dtype=torch.float64)]))
    x = noise.double()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def exact_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (dim, components, rank) in MIXTURES.items():
        mixture = GaussianMixture.random(dim, components, rank, seed=0)
        abar = DPMSolverMultistepScheduler().alphas_cumprod.double()
        log_sigmas = ((1 - abar) / abar).sqrt().log()
        model = exact_model(mixture, log_sigmas)
        n = args.samples[name]
        per_seed: list[dict[str, Any]] = []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
            truth, truth2 = mixture.sample(n, g), mixture.sample(n, g)
            t0 = time.perf_counter()
            ref = reference(model, noise, args.ref_steps)
            half = reference(model, noise, args.ref_steps // 2)
            projections_g = torch.Generator().manual_seed(10_000 + seed)
            entry: dict[str, Any] = {
                "seed": seed,
                "reference_seconds": time.perf_counter() - t0,
                "reference_halving_rmse": float((ref - half).pow(2).mean().sqrt()),
                "sw_floor": float(sliced_wasserstein(truth2, truth, args.projections, projections_g)),
                "sw_reference": float(sliced_wasserstein(ref, truth, args.projections, projections_g)),
                "ll_true": float(mixture.log_prob(truth).mean()),
                "ll_reference": float(mixture.log_prob(ref).mean()),
                "runs": {},
            }
            for sampler, (cls, kwargs) in SAMPLERS.items():
                for grid, grid_kwargs in GRIDS.items():
                    if grid == "logSNR" and sampler not in LOGSNR_OK:
                        continue
                    for nfe in args.nfes:
                        scheduler = cls(**kwargs, **grid_kwargs)
                        x, calls = run_sampler(scheduler, model, noise.float(), nfe)
                        x = x.double()
                        finite = bool(torch.isfinite(x).all())
                        entry["runs"][f"{sampler}|{grid}|{nfe}"] = {
                            "nfe": calls,
                            "rmse": float((x - ref).pow(2).mean().sqrt()) if finite else float("nan"),
                            "sw": float(sliced_wasserstein(x, truth, args.projections, projections_g))
                            if finite
                            else float("nan"),
                            "ll": float(mixture.log_prob(x).mean()) if finite else float("nan"),
                        }
            per_seed.append(entry)
            print(f"  {name} seed {seed}: reference in {entry['reference_seconds']:.1f} s", flush=True)
        results[name] = {"dim": dim, "components": components, "rank": rank, "samples": n, "seeds": per_seed}
    return results


def print_exact(results: dict[str, Any], nfes: tuple[int, ...]) -> None:
    for name, res in results.items():
        seeds = res["seeds"]
        floor = mean_std([s["sw_floor"] for s in seeds])
        halving = max(s["reference_halving_rmse"] for s in seeds)
        ll_true = mean_std([s["ll_true"] for s in seeds])
        print(
            f"\n{name} mixture ({res['components']} components, rank {res['rank']}, {res['samples']} samples, "
            f"{len(seeds)} seeds). Reference halving RMSE {halving:.1e}; SW2 floor {floor[0]:.4f}; "
            f"true LL {ll_true[0]:.3f}"
        )
        keys = list(seeds[0]["runs"])
        rows = list(dict.fromkeys(k.rsplit("|", 1)[0] for k in keys))
        metrics = (("rmse", "RMSE to the reference"), ("sw", "sliced W2 to true samples"), ("ll", "mean LL"))
        for metric, label in metrics:
            print(f"\n  {label} (mean over seeds; ± the std at NFE 10)")
            print(f"  {'sampler':<9} {'grid':<8} | " + " ".join(f"{n:>7}" for n in nfes) + " | ±(10)")
            for row in rows:
                values = [mean_std([s["runs"][f"{row}|{n}"][metric] for s in seeds]) for n in nfes]
                spread = dict(zip(nfes, values, strict=True)).get(10, (0.0, 0.0))[1]
                sampler, grid = row.split("|")
                print(f"  {sampler:<9} {grid:<8} | " + " ".join(f"{v[0]:7.4f}" for v in values) + f" | {spread:.4f}")


def unet_forward_ms(shape: tuple[int, ...]) -> float:
    """Median time of one forward of a small diffusers UNet2DModel (channels 64-128-128, the size of a
    CIFAR-10 DDPM scaled down 2x) on a batch of ``shape``: the model call a sampler step sits next to."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=shape[-1],
        in_channels=shape[1],
        out_channels=shape[1],
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    ).eval()
    x, t = torch.randn(shape), torch.tensor(500)
    times = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            unet(x, t)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def step_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Median time of scheduler.step per step (no model), EVODiff vs DPM++2M, side by side per repeat."""
    foreign = ForeignCpu()
    out: dict[str, Any] = {}
    for label, shape in (("images 64x3x32x32", (64, 3, 32, 32)), ("latents 4x4x64x64", (4, 4, 64, 64))):
        g = torch.Generator().manual_seed(0)
        outputs = [torch.randn(shape, generator=g) * 0.5 for _ in range(20)]
        noise = torch.randn(shape, generator=g)
        times: dict[str, list[float]] = {"EVODiff": [], "DPM++2M": []}
        ratios, clean = [], 0
        for repeat in range(args.repeats):
            order = ["EVODiff", "DPM++2M"] if repeat % 2 == 0 else ["DPM++2M", "EVODiff"]
            start = foreign.snapshot()
            here = {}
            for name in order:
                scheduler = SAMPLERS[name][0](**SAMPLERS[name][1])
                scheduler.set_timesteps(20)
                x = noise
                t0 = time.perf_counter()
                for t, o in zip(scheduler.timesteps, outputs, strict=True):
                    x = scheduler.step(o, t, x).prev_sample
                here[name] = (time.perf_counter() - t0) / 20
            busy = foreign.cores(start, foreign.snapshot())
            is_clean = busy is None or busy < 0.2
            clean += is_clean
            for name, value in here.items():
                times[name].append((is_clean, value))
            ratios.append((is_clean, here["EVODiff"] / here["DPM++2M"]))
        noisy = clean < 3  # too few clean repeats: use all of them, marked NOISY
        times = {k: [v for c, v in vals if c or noisy] for k, vals in times.items()}
        ratios = [v for c, v in ratios if c or noisy]
        unet = unet_forward_ms(shape)
        out[label] = {
            "unet_forward_ms": unet,
            "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items() if v},
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_min_max": (min(ratios), max(ratios)) if ratios else None,
            "clean_repeats": clean,
            "noisy": noisy,
        }
        print(
            f"  {label}: EVODiff {out[label]['ms_per_step'].get('EVODiff', float('nan')):.3f} ms/step, DPM++2M "
            f"{out[label]['ms_per_step'].get('DPM++2M', float('nan')):.3f} ms/step, ratio {out[label]['ratio_median']} "
            f"({clean} clean repeats{', NOISY' if noisy else ''}); one forward of a small UNet2DModel on the "
            f"same batch: {unet:.0f} ms",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer samples and NFEs")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--ref-steps", type=int, default=None, help="reference solver levels (default 2000)")
    parser.add_argument("--projections", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of the step overhead (default 15)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=results_path(__file__))
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.ref_steps = args.ref_steps or (400 if args.quick else 2000)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.nfes = (5, 10) if args.quick else NFES
    args.samples = {"2-D": 1000, "64-D": 500} if args.quick else {"2-D": 4000, "64-D": 2000}
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "diffusion samplers on exact Gaussian mixtures",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    started = time.perf_counter()
    print("exact mixtures ...", flush=True)
    report["exact"] = exact_benchmark(args)
    print("step overhead ...", flush=True)
    report["overhead"] = step_overhead(args)
    report["seconds"] = time.perf_counter() - started
    print_exact(report["exact"], args.nfes)
    args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nWrote {args.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
