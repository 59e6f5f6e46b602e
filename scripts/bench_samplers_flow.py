"""Samplers of flow-matching pipelines (SD3, FLUX) on exactly known Gaussian mixtures: EVODiff against FlowMatchEuler,
DPM-Solver++ 2M and UniPC in the flow parametrisation, and EVODiff's cost per step.

The protocol is :func:`entreg.diffusion.evaluation.flow_mixture_errors` (this script only chooses the settings and
prints): the 2-D and 64-D mixtures of ``scripts/bench_samplers.py`` (``GaussianMixture.preset``), float64, with the
exact velocity ``eps - x_0`` of ``x_t = (1 - sigma) x_0 + sigma eps`` at ``sigma = t / 1000``
(``GaussianMixture.velocity_model``: a flow-matching transformer without error). Reference:
``converged_flow_solution``, DPM-Solver++(2M) on ``--ref-steps`` levels uniform in logSNR between sigma = 1 - 1e-4
and 1e-4 (then ``x = D``), from the same noise; its halving difference is printed.

Grids (``entreg.diffusion.evaluation.FLOW_GRIDS``), each sampler at one model call per step (NFE = steps):

* ``SD3``: what ``StableDiffusion3Pipeline`` gives its scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``'s
  config, ``set_timesteps(N)`` (first level sigma = 1, last positive level ~0.009, then 0);
* ``FLUX``: ``FluxPipeline``: dynamic shifting, ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=1.15)`` (1024 x 1024);
* ``SD3-hand``: the issue's setting: DPM-Solver's flow keys set by hand (``use_flow_sigmas=True,
  prediction_type="flow_prediction", flow_shift=3.0``), each scheduler on DPM-Solver's own flow grid (first level
  ``1 - 1/1000`` before the shift, integer timesteps).

Samplers (``FLOW_SOLVERS``): ``FlowMatchEuler``; ``DPM++2M`` and ``UniPC`` (DPM-Solver's/UniPC's flow keys, the
pipeline's grid written into them); ``EVODiff`` (``EVODiffScheduler.from_config(pipeline config)``, i.e.
``final_step="auto"``), ``EVODiff-e`` / ``EVODiff-f`` (the reference's last step / the ordinary one),
``EVODiff-r`` / ``EVODiff-rf`` (also without ``max_step_ratio``: the reference's second step after sigma ~ 1).
RMSE per coordinate to the reference, mean ± std over ``--seeds`` seeds (each seed new noise).

Cost (``--part cost``): ``scheduler.step`` alone (precomputed model outputs), per step, EVODiff (the SD3 config,
``from_config``) over ``DPMSolverMultistepScheduler`` (DPM-Solver's flow keys), both on SD3's grid, on 4x4x64x64
(SD 1.x latents at 512 x 512) and 4x16x64x64 (SD3's 16 channels) latent batches (``--latent-shapes``), float32,
20 steps, medians of ``--repeats`` interleaved repeats on ``--device``; a repeat counts when other processes used
under 0.2 cores.

Run (from the repository root):
    PYTHONPATH=. python scripts/bench_samplers_flow.py --part rmse    # the solver errors (deterministic), ~5 min
    PYTHONPATH=. python scripts/bench_samplers_flow.py --part cost    # the cost per step (time it on a quiet machine)
    PYTHONPATH=. python scripts/bench_samplers_flow.py --quick        # both parts in < 1 minute (a smoke run)

Writes ``bench_samplers_flow.json`` in ``results/`` (``--out``); a part run alone replaces that part of an existing
file and keeps the other.
"""

from __future__ import annotations

import argparse
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from benchkit import interleaved_step_times, print_nfe_table, results_path, run_parts

from entreg.diffusion.evaluation import FLOW_GRIDS, flow_mixture_errors
from entreg.diffusion.gmm import GaussianMixture

NFES = (5, 6, 8, 10, 15, 20)
MIXTURES = {"2-D": "2d", "64-D": "64d"}  # GaussianMixture.preset names


def rmse_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Per mixture, its size and :func:`flow_mixture_errors` of every seed."""
    results: dict[str, Any] = {}
    for name, preset in MIXTURES.items():
        mixture = GaussianMixture.preset(preset)
        dim, components, rank = GaussianMixture.PRESETS[preset]
        seeds = []
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the final_step advice of EVODiff-e/-f, measured here
                seeds.append(flow_mixture_errors(mixture, args.samples[name], seed, args.nfes, None, args.ref_steps))
            print(f"  {name} seed {seed} done", flush=True)
        results[name] = {"dim": dim, "components": components, "rank": rank, "samples": args.samples[name]}
        results[name]["seeds"] = seeds
    return results


def print_rmse(results: dict[str, Any], nfes: tuple[int, ...]) -> None:
    for name, res in results.items():
        halving = max(s["reference_halving_rmse"] for s in res["seeds"])
        print(
            f"\n{name} mixture ({res['components']} components, rank {res['rank']}, {res['samples']} samples, "
            f"{len(res['seeds'])} seeds). Reference halving RMSE {halving:.1e}"
        )
        print_nfe_table("RMSE to the reference", [s["runs"] for s in res["seeds"]], "rmse", nfes)


def step_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Per latent shape, the median time of scheduler.step per step (no model), EVODiff vs DPM++2M on SD3's flow
    grid, interleaved repeats on ``args.device``."""
    grid = FLOW_GRIDS["SD3"]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ready(name: str) -> Any:
        scheduler = grid.scheduler(name)
        grid.set_timesteps(scheduler, args.steps, device)
        return scheduler

    out: dict[str, Any] = {}
    for label in args.latent_shapes:
        shape = tuple(int(n) for n in label.split("x"))
        g = torch.Generator().manual_seed(0)
        outputs = [torch.randn(shape, generator=g).to(device) for _ in range(args.steps)]
        noise = torch.randn(shape, generator=g).to(device)
        schedulers = {name: partial(ready, name) for name in ("EVODiff", "DPM++2M")}
        out[label] = {"device": str(device), **interleaved_step_times(schedulers, noise, outputs, args.repeats, sync)}
        ms, clean, noisy = out[label]["ms_per_step"], out[label]["clean_repeats"], out[label]["noisy"]
        print(
            f"  latents {label} on {device}: EVODiff {ms['EVODiff']:.3f} ms/step, DPM++2M {ms['DPM++2M']:.3f} ms/step, "
            f"ratio {out[label]['ratio_median']:.3f} ({clean} clean repeats{', NOISY' if noisy else ''})",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("rmse", "cost", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="1 seed, few samples, NFE 5 and 10, a tiny latent")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--ref-steps", type=int, default=None, help="reference solver levels (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of the step cost (default 15)")
    parser.add_argument("--steps", type=int, default=20, help="steps of each timed run")
    parser.add_argument(
        "--latent-shapes", nargs="+", default=None, help="latent batches BxCxHxW (default 4x4x64x64 4x16x64x64)"
    )
    parser.add_argument("--device", default="cpu", help="where the cost part steps (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=results_path(__file__))
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.ref_steps = args.ref_steps or (200 if args.quick else 2000)
    args.repeats = args.repeats or (2 if args.quick else 15)
    args.latent_shapes = args.latent_shapes or (["2x4x8x8"] if args.quick else ["4x4x64x64", "4x16x64x64"])
    args.nfes = (5, 10) if args.quick else NFES
    args.samples = {"2-D": 200, "64-D": 50} if args.quick else {"2-D": 4000, "64-D": 2000}
    torch.set_num_threads(args.threads)
    parts = {"rmse": ("exact mixtures, flow parametrisation", rmse_benchmark), "cost": ("step cost", step_cost)}

    def show(report: dict[str, Any]) -> None:
        if "rmse" in report:
            print_rmse(report["rmse"], args.nfes)

    return run_parts(args, "flow-matching samplers on exact Gaussian mixtures", parts, show)


if __name__ == "__main__":
    main()
