"""Diffusion samplers side by side on a learned model: a small UNet trained on 8x8 digits, EVODiff against
diffusers' solvers.

Why: ``bench_samplers.py`` compares the samplers on exactly known Gaussian mixtures (no network error); this
is its learned half. A scratch prototype found EVODiff 2-4x worse in Frechet distance than DPM-Solver++ on a
small digits UNet at NFE 8-10, while the paper reports CIFAR-10 FID 5.10 -> 2.78 at NFE 10. This script
measures it for our implementation, with seeds and spread, under the settings of the exact half.

How:

1. Model: an epsilon-prediction DDPM (:class:`entreg.modules.diffusion.DiffusionModule`, diffusers' default
   VP schedule: 1000 steps, linear betas 1e-4 to 0.02) of a diffusers ``UNet2DModel``
   (:func:`entreg.nn.denoisers.unet2d`, ``--channels`` per level, default 32-64, ``--layers`` resnet blocks
   per level, default 2, self-attention at the 4x4 level and in the middle block; initialised from seed 0) on the
   1,000-image training split of :class:`entreg.data.DigitsDataModule` (8x8, [-1, 1]), fitted by Lightning:
   batches of ``--batch-size`` drawn with replacement (seed 0), AdamW (lr 1e-3, cosine to 1e-5 over
   ``--train-iters``: the module's ``scheduler``, stepped every batch), EMA 0.999 of the weights (what every
   sampler uses). Training stops at ``--train-iters`` or after ``--train-minutes``, whichever comes first (both
   reported with the last batch's loss and the mean loss of the run). Cached in ``.cache/bench/samplers/``
   (git-ignored; ``--cache-dir``) under a key of these settings (``--retrain`` ignores the cache).
2. Reference: :func:`entreg.diffusion.evaluation.converged_solution`, DPM-Solver++(2M) (our scheduler with its
   EVODiff coefficients neutral) on ``--ref-steps`` (200) uniform-logSNR levels from the largest to the smallest
   training noise level, then the data prediction; the scheduler in float64 (the UNet in float32,
   :func:`entreg.diffusion.evaluation.network_model`), from the same initial noise as the samplers. Checked by
   halving its steps (RMSE 100 vs 200 steps, reported).
3. Samplers and grids: those of ``bench_samplers.py`` (:data:`entreg.diffusion.evaluation.SOLVERS` on ``GRIDS``),
   each run by :func:`entreg.diffusion.evaluation.solver_errors` at NFE 5, 6, 8, 10, 15, 20 (1 model call per
   timestep, checked), in float32, from noise of ``--seeds`` seeds (``--samples`` 500 each).

Metrics, mean over seeds (± the std over seeds at NFE 10):

* RMSE per pixel (in [-1, 1] units) to the reference solution from the same noise (solver error alone);
* Frechet distance (FD) of classifier features (:class:`entreg.diffusion.metrics.FeatureFrechetDistance`): the
  32 ReLU units of :func:`entreg.data.digits_nets.digits_feature_extractor` (an MLP trained once on the digits
  training split, seed 0), between the (unclipped) samples and the 597 held-out test digits; next to it the FD of
  the reference samples and the floor: 500 real training digits (a new draw per seed) against the test digits.

Device: the UNet runs on ``--device`` (``auto``: CUDA when present); schedulers, noise, reference and
metrics stay on the CPU, so the numbers do not depend on the device beyond float rounding in the UNet.
Cost: a full run makes ~3,600 UNet forwards of 500 samples (3 seeds x (15 sampler-grid rows x 64 NFE +
200 reference steps), + 100 for the halving check). On 2 CPU cores shared with other jobs (load ~7) one
forward of the 32-64 UNet took ~0.8 s and a training step of even the 8-16 UNet at batch 256 ~3.5 s, so the full
default run does not fit on such CPUs (hours, and a 6-minute CPU training budget gives ~100 steps: an untrained
model); it is meant for a GPU. The committed ``bench_samplers_learned.json`` is from one H100
(``--train-minutes 4.5 --threads 8``: 5,651 iterations; the whole run took 6 minutes), made before the UNet's
initialisation was seeded (torch seeds its default generator at random on start, so that run's initialisation
is one unrecorded draw). ``--quick`` is a smoke test of the pipeline only.

Run (from the repository root):
    PYTHONPATH=. python scripts/bench_samplers_learned.py                    # on a GPU (training capped at 6 minutes)
    PYTHONPATH=. python scripts/bench_samplers_learned.py --quick            # CPU smoke test (~10 min at load 7)

Writes ``bench_samplers_learned.json`` in ``results/`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from benchkit import (
    add_cache_argument,
    environment,
    mean_std,
    print_nfe_table,
    quiet_libraries,
    results_path,
    shown,
    write_results,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from entreg.data import DigitsDataModule
from entreg.data.digits_nets import digits_feature_extractor
from entreg.diffusion.evaluation import (
    GRIDS,
    LOGSNR_SOLVERS,
    SOLVERS,
    converged_solution,
    network_model,
    rmse,
    solver_errors,
)
from entreg.diffusion.metrics import FeatureFrechetDistance
from entreg.modules.diffusion import DiffusionModule
from entreg.nn.denoisers import unet2d

NFES = (5, 6, 8, 10, 15, 20)


def train_model(args: argparse.Namespace, x_train: Tensor, device: torch.device) -> tuple[nn.Module, dict]:
    """The EMA network of the digits UNet (trained here, or loaded from the cache) and how it was trained."""
    settings = {
        "channels": args.channels,
        "layers": args.layers,
        "train_iters": args.train_iters,
        "train_minutes": args.train_minutes,
        "batch_size": args.batch_size,
        "seed": 0,
        "trainer": "lightning, seeded initialisation",
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = args.cache_dir / f"unet_{key}_{device.type}.pt"
    torch.manual_seed(0)
    denoiser = unet2d(8, 1, block_out_channels=args.channels, layers_per_block=args.layers, attention=True)
    module = DiffusionModule(
        denoiser, "epsilon", ema_decay=0.999, sample_every_n_epochs=0,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.train_iters, eta_min=1e-5),
        scheduler_interval="step",
    )  # fmt: skip
    if path.exists() and not args.retrain:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        module.ema.load_state_dict(saved["ema"])
        print(f"  loaded the trained model from {path}", flush=True)
        return module.ema.module, {**saved["info"], "cached": shown(path)}
    batches = RandomSampler(
        range(len(x_train)), replacement=True, num_samples=args.train_iters * args.batch_size,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    loader = DataLoader(TensorDataset(x_train), args.batch_size, sampler=batches, generator=torch.Generator())
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=args.train_iters,
        max_time=dt.timedelta(minutes=args.train_minutes), limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, loader)
    info = {
        **settings,
        "iterations": trainer.global_step,
        "train_seconds": time.perf_counter() - started,
        "final_loss": float(trainer.callback_metrics["train/loss_step"]),
        "mean_loss": float(trainer.callback_metrics["train/loss_epoch"]),
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "device": str(device),
    }
    module.cpu()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": module.ema.state_dict(), "info": info}, path)
    print(f"  trained {info['iterations']} iterations in {info['train_seconds']:.0f} s", flush=True)
    return module.ema.module, info


def learned_benchmark(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dm = DigitsDataModule(size=8, scale="minus_one_one", seed=0)
    dm.setup("fit")
    x_train, x_test = dm.train_set.tensors[0], dm.test_set.tensors[0]
    t0 = time.perf_counter()
    net, train_info = train_model(args, x_train, device)
    model = network_model(net, device)
    fd = FeatureFrechetDistance(digits_feature_extractor(seed=0, size=8, scale="minus_one_one"), x_test)
    per_seed: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(args.samples, 1, 8, 8, generator=g, dtype=torch.float64)
        real = x_train[torch.randperm(len(x_train), generator=g)[: args.samples]]
        t1 = time.perf_counter()
        reference = converged_solution(model, noise, args.ref_steps)
        entry: dict[str, Any] = {"seed": seed}
        if seed == 0 or args.halving_all_seeds:
            entry["reference_halving_rmse"] = rmse(reference, converged_solution(model, noise, args.ref_steps // 2))
        entry["fd_floor_train_vs_test"] = fd(real)
        entry["fd_reference"] = fd(reference)
        entry["reference_range"] = (float(reference.min()), float(reference.max()))
        entry["runs"] = solver_errors(model, noise, args.nfes, reference, {"fd": fd})
        entry["seconds"] = time.perf_counter() - t1
        per_seed.append(entry)
        print(
            f"  seed {seed}: {entry['seconds']:.1f} s; FD reference {entry['fd_reference']:.3f}, "
            f"floor {entry['fd_floor_train_vs_test']:.3f}",
            flush=True,
        )
    return {
        "training": train_info,
        "samples": args.samples,
        "test_images": len(x_test),
        "train_images": len(x_train),
        "seconds": time.perf_counter() - t0,
        "seeds": per_seed,
    }


def print_learned(res: dict[str, Any], nfes: tuple[int, ...]) -> None:
    seeds, tr = res["seeds"], res["training"]
    halving = [s["reference_halving_rmse"] for s in seeds if "reference_halving_rmse" in s]
    fd_ref, floor = mean_std([s["fd_reference"] for s in seeds]), mean_std([s["fd_floor_train_vs_test"] for s in seeds])
    print(
        f"\ndigits UNet (channels {tr['channels']}, {tr['layers']} blocks/level, {tr['parameters']} parameters, "
        f"{tr['iterations']} iterations in {tr['train_seconds']:.0f} s, final loss {tr['final_loss']:.4f}); "
        f"{res['samples']} samples x {len(seeds)} seeds. Reference halving RMSE {max(halving):.1e}; "
        f"FD reference {fd_ref[0]:.3f} ± {fd_ref[1]:.3f}; FD floor (real train vs test) {floor[0]:.3f} ± {floor[1]:.3f}"
    )
    runs = [s["runs"] for s in seeds]
    print_nfe_table("RMSE per pixel to the reference", runs, "rmse", nfes)
    print_nfe_table("Frechet distance to test digits", runs, "fd", nfes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny training, 1 seed, 64 samples")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--samples", type=int, default=None, help="samples per seed (default 500; quick 64)")
    parser.add_argument("--ref-steps", type=int, default=None, help="reference solver levels (default 200)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="UNet channels (default 32 64)")
    parser.add_argument("--layers", type=int, default=None, help="resnet blocks per level (default 2)")
    parser.add_argument("--train-iters", type=int, default=None, help="default 12000 (quick 200)")
    parser.add_argument("--train-minutes", type=float, default=None, help="cap on the training time (6; quick 0.5)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (quick 64)")
    parser.add_argument("--nfes", type=int, nargs="+", default=None, help=f"default {NFES} (quick 5 10)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached model")
    add_cache_argument(parser, "samplers")
    parser.add_argument("--halving-all-seeds", action="store_true", help="reference halving on every seed")
    parser.add_argument("--device", default="auto", help="where the UNet runs: auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=results_path(__file__))
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.samples = args.samples or (64 if args.quick else 500)
    args.ref_steps = args.ref_steps or (40 if args.quick else 200)
    args.channels = tuple(args.channels or ((8, 16) if args.quick else (32, 64)))
    args.layers = args.layers or (1 if args.quick else 2)
    args.train_iters = args.train_iters or (200 if args.quick else 12000)
    args.train_minutes = args.train_minutes or (0.5 if args.quick else 6.0)
    args.batch_size = args.batch_size or (64 if args.quick else 256)
    args.nfes = tuple(args.nfes or ((5, 10) if args.quick else NFES))
    device_name = args.device
    if device_name == "auto":
        device_name = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    device = torch.device(device_name)
    torch.set_num_threads(args.threads)
    quiet_libraries("`Trainer.fit` stopped", "no `val_dataloader`")
    report = environment(
        benchmark="diffusion samplers on a UNet trained on 8x8 digits",
        diffusers=__import__("diffusers").__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        settings={k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        samplers={k: [cls.__name__, kw] for k, (cls, kw) in SOLVERS.items()},
        grids=GRIDS,
        logsnr_ok=sorted(LOGSNR_SOLVERS),
    )
    started = time.perf_counter()
    print(f"digits UNet on {device} ...", flush=True)
    report["learned"] = learned_benchmark(args, device)
    report["seconds"] = time.perf_counter() - started
    print_learned(report["learned"], args.nfes)
    write_results(args.out, report)
    print(f"\nWrote {args.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
