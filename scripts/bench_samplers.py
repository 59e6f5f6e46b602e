"""Diffusion samplers side by side on exactly known Gaussian mixtures: EVODiff against diffusers' solvers.

Why exact mixtures: under the VP schedule the denoiser of a Gaussian mixture is known in closed form at
every noise level (:class:`entreg.diffusion.gmm.GaussianMixture`), so the samplers are compared with
no training and no network error, on the ODE they all discretise.

The protocol is :func:`entreg.diffusion.evaluation.exact_mixture_errors` (this script only chooses the settings and
prints): a 2-D mixture (8 components, rank-1 plus isotropic covariances) and a 64-D one (10 components, rank 4),
float64, ``GaussianMixture.preset("2d"|"64d")``, under diffusers' default VP schedule (1000 steps, linear betas 1e-4
to 0.02). The model is the exact epsilon-prediction at the noise level of its timestep
(``GaussianMixture.epsilon_model``: log sigma interpolated linearly between training steps, the inverse of
diffusers' ``_sigma_to_t``), so every scheduler sees one and the same model. On the logSNR grid diffusers' multistep
schedulers round their timesteps to integers, so the model sees a level slightly off the one the solver assumes,
as a real network would (under 1% of the RMSE in a check).

Reference solution: ``converged_solution``, DPM-Solver++(2M) (our scheduler with its EVODiff coefficients neutral)
on a uniform logSNR grid of ``--ref-steps`` points from the largest to the smallest training noise level, then the
data prediction, in float64, from the same initial noise; its convergence is checked by halving its steps (the
difference is reported).

Samplers (``entreg.diffusion.evaluation.SOLVERS``), every one at 1 model evaluation per timestep (NFE = number of
timesteps), each on two grids: ``trailing`` (``timestep_spacing="trailing"``) and ``logSNR``
(``use_exponential_sigmas=True``: uniform in log sigma, i.e. in logSNR for VP; DDIM has no such option and runs on
``trailing`` only):

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

Cost (``--part overhead``): the time of ``scheduler.step`` alone (precomputed model outputs), per step, EVODiff over
DPM++2M, on image batches (64, 3, 32, 32) and latents (4, 4, 64, 64), float32, 20 steps, medians of
``--repeats`` repeats; a repeat counts when other processes used under 0.2 cores. Next to it, one
forward of a small ``UNet2DModel`` (channels 64-128-128) on the same batch.

Run (from the repository root):
    PYTHONPATH=. python scripts/bench_samplers.py                # both parts, ~25 minutes on 2 cores
    PYTHONPATH=. python scripts/bench_samplers.py --part exact   # the solver errors alone (deterministic)
    PYTHONPATH=. python scripts/bench_samplers.py --quick        # < 1 minute

Writes ``bench_samplers.json`` in ``results/`` (``--out``); a part run alone replaces that part of an existing file
and keeps the other.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchkit import interleaved_step_times, mean_std, print_nfe_table, results_path, run_parts

from entreg.diffusion.evaluation import SOLVERS, exact_mixture_errors
from entreg.diffusion.gmm import GaussianMixture

NFES = (5, 6, 8, 10, 15, 20)
MIXTURES = {"2-D": "2d", "64-D": "64d"}  # GaussianMixture.preset names


def exact_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Per mixture, its size and :func:`exact_mixture_errors` of every seed."""
    results: dict[str, Any] = {}
    for name, preset in MIXTURES.items():
        mixture = GaussianMixture.preset(preset)
        dim, components, rank = GaussianMixture.PRESETS[preset]
        seeds = []
        for seed in range(args.seeds):
            seeds.append(
                exact_mixture_errors(mixture, args.samples[name], seed, args.nfes, args.ref_steps, args.projections)
            )
            print(f"  {name} seed {seed} done", flush=True)
        results[name] = {"dim": dim, "components": components, "rank": rank, "samples": args.samples[name]}
        results[name]["seeds"] = seeds
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
        runs = [s["runs"] for s in seeds]
        print_nfe_table("RMSE to the reference", runs, "rmse", nfes)
        print_nfe_table("sliced W2 to true samples", runs, "sw", nfes)
        print_nfe_table("mean LL", runs, "ll", nfes)


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

    def ready(name: str) -> Any:
        scheduler = SOLVERS[name][0](**SOLVERS[name][1])
        scheduler.set_timesteps(20)
        return scheduler

    out: dict[str, Any] = {}
    for label, shape in (("images 64x3x32x32", (64, 3, 32, 32)), ("latents 4x4x64x64", (4, 4, 64, 64))):
        g = torch.Generator().manual_seed(0)
        outputs = [torch.randn(shape, generator=g) * 0.5 for _ in range(20)]
        noise = torch.randn(shape, generator=g)
        timing = interleaved_step_times(
            {name: partial(ready, name) for name in ("EVODiff", "DPM++2M")}, noise, outputs, args.repeats
        )
        unet = unet_forward_ms(shape)
        out[label] = {"unet_forward_ms": unet, **timing}
        ms, clean, noisy = timing["ms_per_step"], timing["clean_repeats"], timing["noisy"]
        print(
            f"  {label}: EVODiff {ms['EVODiff']:.3f} ms/step, DPM++2M {ms['DPM++2M']:.3f} ms/step, ratio "
            f"{out[label]['ratio_median']:.3f} ({clean} clean repeats{', NOISY' if noisy else ''}); one forward "
            f"of a small UNet2DModel on the same batch: {unet:.0f} ms",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("exact", "overhead", "both"), default="both")
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
    parts = {"exact": ("exact mixtures", exact_benchmark), "overhead": ("step overhead", step_overhead)}

    def show(report: dict[str, Any]) -> None:
        if "exact" in report:
            print_exact(report["exact"], args.nfes)

    return run_parts(args, "diffusion samplers on exact Gaussian mixtures", parts, show)


if __name__ == "__main__":
    main()
