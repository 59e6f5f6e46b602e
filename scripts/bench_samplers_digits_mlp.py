"""Samplers on a learned model that trains in seconds on CPU: an MLP denoiser of the 8x8 digits.

What: ``entreg-train`` (``entreg.cli.train``) of the real configs ``model=diffusion_mlp data=digits_diffusion``
with ``data.size=8 data.batch_size=128``: ``DiffusionModule`` with ``MLPDenoiser(64)`` (256 wide, 3 layers) on the
1,000 training digits in [-1, 1], v-prediction (epsilon-prediction too, which this small MLP learns poorly: its
samples stay far from the data whatever the sampler), AdamW lr 2e-3 (weight decay 0.01), 60 epochs, EMA 0.99,
seed 0, no validation. Samplers built on the model's training noise schedule
(``DiffusionModule.make_scheduler``): DPM-Solver++ 2M (``dpm2m``), UniPC, EVODiff as released (``evodiff``) and
with ``final_step="dpmsolver"`` (``evodiff_f``), each on diffusers' ``linspace`` and ``trailing`` spacings and a
logSNR grid (``use_exponential_sigmas``), at NFE 5, 10 and 20, run by
:func:`entreg.diffusion.evaluation.solver_errors`; 597 samples from 3 noise seeds (1, 2, 3) per cell. Metric:
Frechet distance of the features of ``digits_feature_extractor`` between the samples and the 597 test digits
(:class:`entreg.diffusion.metrics.FeatureFrechetDistance`); floor: 597 training digits vs the test digits; the
model's own level: 200 logSNR DPM-Solver++ steps (noise seed 1).

Why: the exact-mixture benchmark (``bench_samplers.py``) measures solver error with no model error;
``bench_samplers_learned.py`` (a UNet) needs a GPU or hours here. This is the learned-model check that
fits the CPU.

Run: ``PYTHONPATH=. python scripts/bench_samplers_digits_mlp.py`` (a few minutes on 2 cores); writes
``bench_samplers_digits_mlp.json`` in ``results/`` (per-seed FDs under ``fd``, keyed
``<prediction>|<sampler>|<grid>|<nfe>``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchkit import environment, quiet_libraries, results_path, write_results
from hydra import compose, initialize_config_module

from entreg.cli import train
from entreg.data import DigitsDataModule
from entreg.data.digits_nets import digits_feature_extractor
from entreg.diffusion.evaluation import network_model, run_solver, solver_errors, solver_rows
from entreg.diffusion.metrics import FeatureFrechetDistance
from entreg.modules.diffusion import DiffusionModule

OVERRIDES = [
    "model=diffusion_mlp", "~backbone", "data=digits_diffusion", "data.size=8", "data.batch_size=128",
    "model.denoiser.dim=64", "+model.denoiser.shape=[1,8,8]", "model.ema_decay=0.99", "model.optimizer.lr=2e-3",
    "model.optimizer.weight_decay=0.01", "model.sample_every_n_epochs=0", "trainer.max_epochs=60",
    "++trainer.limit_val_batches=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "callbacks=none", "logger=none", "test=false", "seed=0",
]  # fmt: skip
PREDICTIONS = ("v_prediction", "epsilon")
SAMPLERS = {"dpm2m": "DPM++2M", "unipc": "UniPC", "evodiff": "EVODiff", "evodiff_f": "EVODiff-f"}
GRIDS = ("linspace", "trailing", "logSNR")
NFES, SEEDS, N = (5, 10, 20), (1, 2, 3), 597


def trained(prediction: str, output_dir: str) -> DiffusionModule:
    """``entreg-train`` of the composed config for ``prediction``; the module of its last checkpoint."""
    checkpoints = Path(output_dir) / "checkpoints"
    overrides = [
        *OVERRIDES, f"model.prediction_type={prediction}", f"paths.output_dir={output_dir}",
        "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.last.dirpath={checkpoints}", "+callbacks.last.save_last=true", "+callbacks.last.save_top_k=0",
    ]  # fmt: skip
    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return DiffusionModule.load_checkpoint(checkpoints / "last.ckpt")


def sampler_fds(module: DiffusionModule, fd: FeatureFrechetDistance) -> dict[str, Any]:
    """FD of the model's own level (200 logSNR steps) and, per sampler, grid and NFE, of each noise seed."""
    model = network_model(module.ema.module)
    make = lambda cls, options: module.make_scheduler(f"{cls.__module__}.{cls.__name__}", **options)  # noqa: E731
    rows = solver_rows(SAMPLERS.values(), GRIDS, make, extra_grids={"linspace": {}})
    noise = {seed: torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in SEEDS}
    out: dict[str, Any] = {"reference200": fd(run_solver(rows["DPM++2M|logSNR"](), model, noise[1], 200))}
    per_seed = [solver_errors(model, noise[seed], NFES, metrics={"fd": fd}, solvers=rows) for seed in SEEDS]
    for arm, solver in SAMPLERS.items():
        for grid in GRIDS:
            for nfe in NFES:
                out[f"{arm}|{grid}|{nfe}"] = [runs[f"{solver}|{grid}|{nfe}"]["fd"] for runs in per_seed]
                print(module.prediction_type, arm, grid, nfe, [round(v, 1) for v in out[f"{arm}|{grid}|{nfe}"]])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=results_path(__file__))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    quiet_libraries(
        "`Trainer.fit` stopped", "no `val_dataloader`", "The number of training batches", "EVODiff's last step"
    )
    start = time.perf_counter()
    dm = DigitsDataModule(size=8, scale="minus_one_one")
    dm.setup("fit")
    fd = FeatureFrechetDistance(digits_feature_extractor(), dm.test_set.tensors[0])
    report = environment(benchmark="samplers on a digits MLP denoiser", overrides=OVERRIDES)
    report["floor_train_vs_test"] = fd(dm.train_set.tensors[0][:N])
    report["fd"] = {}
    for prediction in PREDICTIONS:
        with tempfile.TemporaryDirectory(prefix="entreg_bench_digits_mlp_") as tmp:
            module = trained(prediction, tmp)
        fds = sampler_fds(module, fd)
        report["fd"].update({f"{prediction}|{key}": value for key, value in fds.items()})
    report["seconds"] = time.perf_counter() - start
    write_results(args.out, report)
    return report


if __name__ == "__main__":
    main()
