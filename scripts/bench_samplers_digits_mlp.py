"""Samplers on a learned model that trains in seconds on CPU: an MLP denoiser of the 8x8 digits.

What: ``DiffusionModule`` with ``MLPDenoiser(64)`` on the 1,000 training digits in [-1, 1], v-prediction
(epsilon-prediction too, which this small MLP learns poorly: its samples stay far from the data
whatever the sampler), AdamW lr 2e-3, batch 128, 60 epochs, EMA 0.99, seed 0. Samplers of
``DiffusionModule.make_scheduler`` (the training noise schedule): DPM-Solver++ 2M (``dpm2m``), UniPC,
EVODiff as released (``evodiff``) and with ``final_step="dpmsolver"`` (``evodiff_f``), each on
diffusers' ``linspace`` and ``trailing`` spacings and a logSNR grid (``use_exponential_sigmas``), at
NFE 5, 10 and 20; 597 samples from 3 noise seeds (1, 2, 3) per cell. Metric: Frechet distance of the
features of ``digits_feature_extractor`` between the samples and the 597 test digits; floor: 597
training digits vs the test digits; the model's own level: 200 logSNR DPM-Solver++ steps.

Why: the exact-mixture benchmark (``bench_samplers.py``) measures solver error with no model error;
``bench_samplers_learned.py`` (a UNet) needs a GPU or hours here. This is the learned-model check that
fits the CPU.

Run: ``PYTHONPATH=. python scripts/bench_samplers_digits_mlp.py`` (a few minutes on 2 cores); writes
``bench_samplers_digits_mlp.json`` in ``results/`` (per-seed FDs).
"""

from __future__ import annotations

import json
import time
import warnings
from functools import partial

import lightning as L
import torch
from benchkit import results_path

from entreg.data import DigitsDataModule
from entreg.data.digits_nets import digits_feature_extractor
from entreg.diffusion.metrics import frechet_distance
from entreg.modules.diffusion import DiffusionModule
from entreg.nn.denoisers import MLPDenoiser

GRIDS = {"linspace": {}, "trailing": {"timestep_spacing": "trailing"}, "logSNR": {"use_exponential_sigmas": True}}
ARMS = {
    "dpm2m": ("dpmsolver", {}),
    "unipc": ("unipc", {}),
    "evodiff": ("evodiff", {}),
    "evodiff_f": ("evodiff", {"final_step": "dpmsolver"}),
}
NFES, SEEDS, N = (5, 10, 20), (1, 2, 3), 597


def main() -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    start = time.perf_counter()
    features = digits_feature_extractor()
    dm = DigitsDataModule(size=8, scale="minus_one_one", batch_size=128)
    dm.setup("fit")
    test = features(dm.test_set.tensors[0])
    results: dict = {"floor_train_vs_test": frechet_distance(features(dm.train_set.tensors[0][:N]), test)}
    for prediction in ("v_prediction", "epsilon"):
        L.seed_everything(0)
        model = DiffusionModule(
            MLPDenoiser(64, shape=(1, 8, 8)),
            prediction_type=prediction,
            ema_decay=0.99,
            optimizer=partial(torch.optim.AdamW, lr=2e-3),
            sample_every_n_epochs=0,
        )
        trainer = L.Trainer(
            max_epochs=60,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, dm)
        model.eval()
        reference = model.make_scheduler("dpmsolver", use_exponential_sigmas=True)
        x = model.sample(N, reference, 200, torch.Generator().manual_seed(1))
        results[f"{prediction}|reference200"] = frechet_distance(features(x), test)
        for arm, (name, options) in ARMS.items():
            for grid, grid_options in GRIDS.items():
                for nfe in NFES:
                    fds = []
                    for seed in SEEDS:
                        scheduler = model.make_scheduler(name, **options, **grid_options)
                        x = model.sample(N, scheduler, nfe, torch.Generator().manual_seed(seed))
                        fds.append(frechet_distance(features(x), test) if torch.isfinite(x).all() else float("nan"))
                    results[f"{prediction}|{arm}|{grid}|{nfe}"] = fds
                    print(prediction, arm, grid, nfe, [round(v, 1) for v in fds], flush=True)
    results["seconds"] = time.perf_counter() - start
    results_path(__file__).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
