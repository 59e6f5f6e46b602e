"""Test-time adaptation on shifted digits: online error of Tent, ETA, EATA, OSTTA, SAR and DeYO.

A CPU benchmark of the scenarios the reference implementations run on ImageNet-C (Tent, EATA, SAR, DeYO;
below), at a smaller scale. This script only composes: the streams are :mod:`entreg.tta.protocols`, every row
(``source`` and ``bn_adapt`` included) runs through :class:`entreg.callbacks.TestTimeAdaptation` in
``trainer.test`` (:func:`entreg.callbacks.tta_benchmark.run_stream`), the per-segment metrics are
:class:`entreg.tta.benchmark.OnlineStats`, the sources are fitted by Lightning. The speed of the methods is
``bench_tta_speed.py``'s.

Data, "digits-C" (default): the 597 test digits of the fixed split (data seed 0), upsampled to 32x32,
under ImageNet-C's 15 corruptions from ``imagecorruptions-imaug`` (``pip install entreg[corruptions]``),
generated once per (corruption, severity, noise seed) and cached with a sha256 by
:class:`entreg.data.DigitsCCache` (``~/.cache/entreg/digits_c``). ImageNet-C's constants at 32 px: the
numbers are comparable with nothing published. ``--corruptions torch`` uses entreg's five torch
stand-ins (:func:`entreg.data.shifts.apply_shift`) instead.

Sources, trained from scratch on the clean 1000-image training split (1 channel) by ``Trainer.fit`` of a
:class:`~entreg.modules.ClassificationModule` (cross-entropy), batch 64 in the order of one generator seeded with
the benchmark seed (a fresh permutation each epoch), no augmentation, the initialisation seeded with the benchmark
seed; weights cached in ``.cache/bench/tta/`` (git-ignored; ``--cache-dir``) by settings and seed; their clean test
accuracy is reported:

* ``small_cnn`` (``widths=(16, 32, 64)``, half the width of ``configs/backbone/small_cnn.yaml``) with
  BatchNorm, and the same network with GroupNorm: the recipe of ``configs/model/classifier.yaml``
  (AdamW lr 3e-3, weight decay 5e-4, cosine schedule), 15 epochs;
* a 12-block timm ViT (``vit_tiny_patch16_224`` narrowed to width 64, 2 heads, 8x8 patches; 0.6 M
  parameters), AdamW lr 3e-3, weight decay 0.05, cosine, 40 epochs: the LayerNorm path of SAR/DeYO
  (``--no-vit`` leaves it out);
* for the open-set scenario, the two CNNs again, trained on the digits 0-7 only (8 outputs).

Streams (:func:`entreg.tta.protocols.protocol`), identical for every method (paired), batch 64 (the last batch of
each corruption holds 21); the noise of each corruption and the order of the samples (``shuffle=True``, the
protocol's seed) are drawn from the benchmark seed. Scenarios:

* ``mild``: protocol ``mild`` at severity 3: each corruption a stream of its own, the method reset between them;
* ``continual``: protocol ``continual``: the 15 corruptions at severity 5 one after the other, never reset
  (EATA's and CoTTA's continual setting); afterwards the error of the adapted model on the clean test set (no
  update) measures forgetting;
* ``label shift``: protocol ``label_shift`` (class-sorted) at severity 3 (SAR's imbalanced scenario);
* ``open-set``: protocol ``open_set`` on the mild streams (all 10 digits) seen by the sources that know 0-7:
  online error on the known digits, the AUROC of the max-softmax probability for known vs unknown, and the
  share of known and of unknown samples each method put in its loss (from :attr:`entreg.tta.StepInfo.mask`);
* ``mild sev 5``: as ``mild`` at severity 5 (``--sev5`` adds it).

Arms: ``source`` (no adaptation, BatchNorm running statistics) and ``BN-adapt`` (batch statistics, no update): the
methods ``source`` and ``bn_adapt``; Tent, ETA, EATA (Fisher through the callback's ``source_batches``: 8 batches
of 25 clean validation images), OSTTA on the BatchNorm model; SAR and DeYO on the GroupNorm model
and the ViT (their settings) and on the BatchNorm model. Thresholds are the classes' defaults, the
papers' values scaled to C classes where the papers scale them: E0 = 0.4 ln C (EATA, SAR, DeYO's
weight), DeYO tau_Ent = 0.5 ln C and tau_PLPD = 0.2, EATA's ImageNet d_margin = 0.05 (passed explicitly:
the class default now follows C, 0.4 for 10 classes) and SAR's recovery threshold 0.2 (an ImageNet
constant that the class does not scale). EATA's redundancy filter
|cos(m, p)| < 0.05 keeps almost nothing with 10 classes (the cosine of a confident prediction with a
mean over classes is ~1/sqrt(10)), so ETA and EATA also run with EATA's CIFAR-10 value d_margin = 0.4
(rows ``eta d0.4``, ``eata d0.4``; the value of ``configs/method/eata.yaml``). Optimiser SGD,
momentum 0.9. Every method runs with its model in ``eval()`` mode, as under Lightning.

Learning rate: each method picks lr from {1e-3, 1e-2} by its mean online error on *validation
corruptions*, ImageNet-C's four held-out ones (speckle_noise, gaussian_blur, spatter, saturate) at
severity 3 (mild scenario, same seeds; tent#4's practice of tuning on held-out corruptions; with
``--corruptions torch``: gaussian_noise and brightness at severity 2). The tables give the chosen lr
(``*``) and, when it differs, the untuned lr = 1e-3 too. ``--lr-grid`` changes the candidates.

Metrics (:meth:`entreg.tta.benchmark.OnlineStats.result`): online error (argmax of the logits from *before* each
update, the papers' measure) per shift and its mean; per seed, the paired difference from BN-adapt and from the
same model's source (mean ± sample std over seeds, and in how many seeds the method was better); the fraction of
samples selected for the loss; the number of SAR-style recovery resets; the share of the most predicted
class (collapse). With 597 test images a binomial standard error is ~1.9 points at 30% error:
differences under ~3 points mean nothing unless they hold in every seed.

Run (from the repository root):
    PYTHONPATH=. python scripts/bench_tta.py             # full: 3 seeds, ~40 minutes on 2 cores
    PYTHONPATH=. python scripts/bench_tta.py --quick     # 1 seed, 2 shifts, 3 batches each: ~1 minute
    PYTHONPATH=. python scripts/bench_tta.py --seeds 5 --out tta_5seeds.json

Writes ``bench_tta.json`` in ``results/`` (``--out``): settings, versions, every per-seed number.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from benchkit import add_cache_argument, mean_std, quiet_libraries, results_path, shown
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.callbacks.tta_benchmark import run_stream
from entreg.data.corruptions import COMMON_CORRUPTIONS
from entreg.data.digits import DigitsDataModule
from entreg.data.digits_c import DigitsCCache
from entreg.data.shifts import SHIFTS
from entreg.modules.classification import ClassificationModule
from entreg.tta import METHODS, Segment, Stream, protocol

NUM_CLASSES = 10
WIDTHS = (16, 32, 64)
EPOCHS = 15
WEIGHT_DECAY = 5e-4
TRAIN_LR = 3e-3
# a 12-block ViT (SAR's ``blocks.9-11`` exclusion applies) narrowed to run on 2 cores: 8x8 patches of the 32x32
# images, width 64, 2 heads (0.6 M parameters; ~89% clean accuracy after 40 epochs, ~1 minute)
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2}
VIT_RECIPE = {"epochs": 40, "lr": 3e-3, "weight_decay": 0.05}
KNOWN = 8  # open-set sources learn digits 0-7; the streams also hold 8 and 9
BATCH = 64
SEVERITY = 3
CONTINUAL_SEVERITY = 5  # EATA's and CoTTA's continual stream: every corruption at severity 5
LR_GRID = (1e-3, 1e-2)
UNTUNED_LR = 1e-3
FISHER_BATCHES, FISHER_BATCH = 8, 25  # all 200 clean validation images
SHORT = {"gaussian_noise": "gauss", "impulse_noise": "impul", "contrast": "contr", "brightness": "brigh"}
SHORT["gaussian_blur"] = "blur"


@dataclass(frozen=True)
class Arm:
    """One row: ``method`` is a name of :data:`entreg.tta.METHODS` (``source`` and ``bn_adapt`` included)."""

    label: str
    method: str
    norm: str  # "batch", "group" or "vit": which source model
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def tuned(self) -> bool:
        """Whether the method trains (and so has an lr to choose)."""
        return METHODS[self.method].updates

    @property
    def baseline(self) -> str:
        """Label of the same model's source row."""
        return {"batch": "source", "group": "source GN", "vit": "source ViT"}[self.norm]

    def callback(self, lr: float) -> TestTimeAdaptation:
        """The row's :class:`TestTimeAdaptation` (EATA reads its Fisher batches from the clean validation data)."""
        options = dict(self.kwargs) | ({"lr": lr} if self.tuned else {})
        if METHODS[self.method].uses_source_data:
            options["source_batches"] = FISHER_BATCHES
        return TestTimeAdaptation(self.method, **options)


ARMS: tuple[Arm, ...] = (
    Arm("source", "source", "batch"),
    Arm("BN-adapt", "bn_adapt", "batch"),
    Arm("tent", "tent", "batch"),
    Arm("eta", "eta", "batch", (("d_margin", 0.05),)),  # ImageNet's value, as the published runs of this table
    Arm("eata", "eata", "batch", (("d_margin", 0.05),)),
    Arm("eta d0.4", "eta", "batch", (("d_margin", 0.4),)),
    Arm("eata d0.4", "eata", "batch", (("d_margin", 0.4),)),
    Arm("ostta", "ostta", "batch"),
    Arm("sar BN", "sar", "batch"),
    Arm("deyo BN", "deyo", "batch"),
    Arm("source GN", "source", "group"),
    Arm("sar GN", "sar", "group"),
    Arm("deyo GN", "deyo", "group"),
    Arm("source ViT", "source", "vit"),
    Arm("sar ViT", "sar", "vit"),
    Arm("deyo ViT", "deyo", "vit"),
)
OPEN_SET_NORMS = ("batch", "group")  # the ViT is left out of the open-set scenario (its training costs most)


def compact(value: Any) -> Any:
    """``value`` with every float rounded to 6 significant digits (a smaller JSON, nothing lost that matters)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Data and source models
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruptions:
    """Where the shifted images come from: ``backend`` of :class:`entreg.data.DigitsCCache` ("imagecorruptions":
    digits-C; "torch": entreg's stand-ins), the test shifts, and the held-out shifts that pick the lr."""

    backend: str
    shifts: tuple[str, ...]
    val_shifts: tuple[str, ...]
    val_severity: int


DIGITS_C = Corruptions(
    "imagecorruptions",
    COMMON_CORRUPTIONS,  # ImageNet-C's 15 test corruptions, in the standard order
    ("speckle_noise", "gaussian_blur", "spatter", "saturate"),  # its 4 validation corruptions (tent#4)
    SEVERITY,
)
TORCH_SHIFTS = Corruptions("torch", SHIFTS, ("gaussian_noise", "brightness"), 2)  # the stand-ins at severity 2


@dataclass
class Digits:
    """The fixed split as tensors (normalised) and the normalisation of the [0, 1] images."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    mean: float
    std: float


def load_digits() -> Digits:
    dm = DigitsDataModule(size=32, channels=1, batch_size=BATCH, seed=0)
    dm.setup("fit")
    mean, std = dm.normalization
    return Digits(dm.train_set.tensors, dm.val_set.tensors, dm.test_set.tensors, mean, std)


class Domain(NamedTuple):
    """A shifted copy of the test digits (the fields a protocol reads)."""

    name: str
    dataset: Dataset
    corruption: str
    severity: int


def shifted_domains(data: Digits, cache: DigitsCCache, shifts: list[str], severity: int, seed: int) -> list[Domain]:
    """Every shift of the test images (normalised; shift k drawn with seed ``seed + 1000 k``, cached)."""
    images, labels = data.test
    clean = (images[:, 0] * data.std + data.mean).clamp(0, 1)
    domains = []
    for k, shift in enumerate(shifts):
        shifted = torch.from_numpy(cache.get(clean, shift, severity, seed=seed + 1000 * k)).float()
        if shifted.max() > 1.5:  # digits-C is uint8
            shifted = shifted / 255
        x = ((shifted - data.mean) / data.std).unsqueeze(1)
        domains.append(Domain(shift, TensorDataset(x, labels), shift, severity))
    return domains


def truncated(stream: Stream, max_batches: int | None) -> Stream:
    """``stream`` with the first ``max_batches`` batches of each segment (all: ``None``)."""
    if max_batches is None:
        return stream
    segments = [
        Segment(s.name, s.dataset, s.indices[: max_batches * s.batch_size], s.batch_size) for s in stream.segments
    ]
    return Stream(stream.protocol, segments)


def build_module(norm: str, classes: int = NUM_CLASSES, **options: Any) -> ClassificationModule:
    if norm == "vit":
        return ClassificationModule("vit_tiny_patch16_224", classes, 1, backbone_kwargs=VIT, **options)
    return ClassificationModule("small_cnn", classes, 1, backbone_kwargs={"widths": WIDTHS, "norm": norm}, **options)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float(torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(y), 256)]).eq(y).float().mean())


class EpochBatches(Sampler[list[int]]):
    """Batches of ``batch`` in a fresh permutation each epoch, all drawn from one generator seeded with ``seed``."""

    def __init__(self, size: int, batch: int, seed: int) -> None:
        self.size, self.batch, self.generator = size, batch, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        return iter([order[i : i + self.batch] for i in range(0, self.size, self.batch)])

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch)


def source_model(
    data: Digits, norm: str, seed: int, epochs: int, cache: Path, classes: int = NUM_CLASSES
) -> tuple[ClassificationModule, dict[str, Any]]:
    """The source model of ``norm`` trained with ``seed`` on the digits below ``classes`` (loaded from
    ``cache`` when there). The ViT has a recipe of its own (:data:`VIT_RECIPE`; ``epochs`` is the CNNs')."""
    if norm == "vit":
        epochs, lr, weight_decay = VIT_RECIPE["epochs"], VIT_RECIPE["lr"], VIT_RECIPE["weight_decay"]
        name = "vit_" + "_".join(f"{k}{v}" for k, v in VIT.items())
    else:
        lr, weight_decay = TRAIN_LR, WEIGHT_DECAY
        name = f"small_cnn_{norm}_w{'-'.join(map(str, WIDTHS))}"
    known = "" if classes == NUM_CLASSES else f"_known{classes}"
    path = cache / f"{name}{known}_e{epochs}_lr{lr:g}_wd{weight_decay:g}_cos_seed{seed}.pt"
    start = time.perf_counter()
    cached = path.is_file()
    torch.manual_seed(seed)
    module = build_module(
        norm,
        classes,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    if cached:
        module.backbone.load_state_dict(torch.load(path, weights_only=True))
    else:
        x, y = data.train
        x, y = x[y < classes], y[y < classes]
        loader = DataLoader(TensorDataset(x, y), batch_sampler=EpochBatches(len(y), BATCH, seed))
        L.Trainer(max_epochs=epochs, **TRAINER).fit(module, loader)
        cache.mkdir(parents=True, exist_ok=True)
        partial_file = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(module.backbone.state_dict(), partial_file)
        os.replace(partial_file, path)  # atomic: a concurrent run never reads half a file
    module.eval()
    (x_test, y_test), (x_val, y_val) = data.test, data.val
    info = {
        "norm": norm,
        "classes": classes,
        "seed": seed,
        "cached": cached,
        "path": shown(path),
        "seconds": time.perf_counter() - start,
        "clean_test_acc": accuracy(module, x_test[y_test < classes], y_test[y_test < classes]),
        "clean_val_acc": accuracy(module, x_val[y_val < classes], y_val[y_val < classes]),
    }
    return module, info


# ----------------------------------------------------------------------------------------------
# Streams and runs
# ----------------------------------------------------------------------------------------------

TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def trainer(callbacks: list[L.Callback], log: bool) -> L.Trainer:
    return L.Trainer(callbacks=callbacks, **TRAINER)


@dataclass
class Scenario:
    """A stream and whether its sources are the open-set ones (trained on the digits below :data:`KNOWN`)."""

    stream: Stream
    open_set: bool = False


@dataclass
class SeedData:
    """Everything one seed needs: sources (by norm; ``"<norm> open"`` for the open-set ones), the clean validation
    images (EATA's Fisher batches), the clean test stream (forgetting), the streams of every scenario."""

    sources: dict[str, nn.Module]
    fisher: Dataset
    clean: Segment
    scenarios: dict[str, Scenario]
    validation: Stream


def seed_data(
    data: Digits,
    corruptions: Corruptions,
    sources: dict[str, nn.Module],
    seed: int,
    shifts: list[str],
    sev5: bool,
    max_batches: int | None,
) -> SeedData:
    cache = DigitsCCache(backend=corruptions.backend)
    mild_seed, continual_seed, val_seed = 10_000 * (seed + 1), 10_000 * (seed + 1) + 500, 10_000 * (seed + 1) + 700
    domains3 = shifted_domains(data, cache, shifts, SEVERITY, mild_seed)
    domains5 = shifted_domains(data, cache, shifts, CONTINUAL_SEVERITY, continual_seed)

    def build(name: str, domains: list[Domain], stream_seed: int, severity: int = SEVERITY) -> Stream:
        chosen = protocol(name, severities=(severity,), shuffle=True)
        return truncated(chosen.build(domains, BATCH, seed=stream_seed), max_batches)

    scenarios = {
        "mild": Scenario(build("mild", domains3, mild_seed)),
        "continual": Scenario(build("continual", domains5, continual_seed, CONTINUAL_SEVERITY)),
        "label shift": Scenario(build("label_shift", domains3, mild_seed)),
        "open-set": Scenario(build("open_set", domains3, mild_seed), open_set=True),
    }
    if sev5:
        scenarios["mild sev 5"] = Scenario(build("mild", domains5, continual_seed, CONTINUAL_SEVERITY))
    val_domains = shifted_domains(data, cache, list(corruptions.val_shifts), corruptions.val_severity, val_seed)
    validation = build("mild", val_domains, val_seed, corruptions.val_severity)
    x_val, y_val = data.val
    fisher = TensorDataset(x_val[: FISHER_BATCHES * FISHER_BATCH], y_val[: FISHER_BATCHES * FISHER_BATCH])
    x, y = data.test
    clean = Segment("clean", TensorDataset(x, y), torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)),
                    BATCH)  # fmt: skip
    return SeedData(sources, fisher, clean, scenarios, validation)


def run(arm: Arm, lr: float, source: nn.Module, stream: Stream, sd: SeedData, seed: int, forgetting: bool) -> dict:
    """One arm on one stream (the package's run); ``forgetting``: also the clean error afterwards."""
    after = {"clean": sd.clean} if forgetting else None
    return run_stream(source, stream, arm.callback(lr), trainer, sd.fisher, after, seed=seed,
                      source_batch_size=FISHER_BATCH)  # fmt: skip


def select_lrs(arms: list[Arm], seeds: dict[int, SeedData], grid: tuple[float, ...]) -> dict[str, Any]:
    """Per tuned arm, the lr of ``grid`` with the lowest mean online error on the validation shifts."""
    result: dict[str, Any] = {}
    for arm in arms:
        if not arm.tuned:
            continue
        errors: dict[float, list[float]] = {}
        for lr in grid:
            for seed, sd in seeds.items():
                segments = run(arm, lr, sd.sources[arm.norm], sd.validation, sd, seed, False)["segments"]
                errors.setdefault(lr, []).append(statistics.fmean(s["error"] for s in segments.values()))
        means = {lr: statistics.fmean(v) for lr, v in errors.items()}
        chosen = min(grid, key=lambda lr: (means[lr], lr))
        result[arm.label] = {"chosen": chosen, "val_error_mean": {f"{lr:g}": means[lr] for lr in grid}}
        result[arm.label]["val_error_per_seed"] = {f"{lr:g}": errors[lr] for lr in grid}
    return result


def run_quality(arms: list[Arm], seeds: dict[int, SeedData], lrs: dict[str, Any]) -> list[dict]:
    """Every (arm, lr, seed, scenario): per-shift results; continual adds the clean error afterwards."""
    runs = []
    for seed, sd in seeds.items():
        t0 = time.perf_counter()
        for arm in arms:
            arm_lrs = [0.0]
            if arm.tuned:
                chosen = lrs[arm.label]["chosen"]
                arm_lrs = [chosen] + ([UNTUNED_LR] if chosen != UNTUNED_LR else [])
            for lr in arm_lrs:
                for scenario, chosen_stream in sd.scenarios.items():
                    source = sd.sources.get(f"{arm.norm} open" if chosen_stream.open_set else arm.norm)
                    if source is None:
                        continue
                    start = time.perf_counter()
                    result = run(arm, lr, source, chosen_stream.stream, sd, seed, scenario == "continual")
                    shifts = result["segments"]
                    entry: dict[str, Any] = {
                        "arm": arm.label,
                        "lr": lr if arm.tuned else None,
                        "tuned": (not arm.tuned) or lr == lrs[arm.label]["chosen"],
                        "untuned": (not arm.tuned) or lr == UNTUNED_LR,
                        "seed": seed,
                        "scenario": scenario,
                        "shifts": shifts,
                        "mean_error": statistics.fmean(s["error"] for s in shifts.values()),
                        "seconds": time.perf_counter() - start,
                    }
                    if "clean" in result["after"]:
                        entry["clean_error_after"] = result["after"]["clean"]["error"]
                    runs.append(entry)
        print(
            f"  seed {seed}: {sum(r['seed'] == seed for r in runs)} runs in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return runs


def summarise(runs: list[dict], arms: list[Arm]) -> list[dict[str, Any]]:
    """One row per (scenario, arm, lr kind) with means, spreads and paired differences."""
    rows = []
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})

    def find(label: str, scenario: str, kind: str) -> dict[int, dict]:
        return {r["seed"]: r for r in runs if r["arm"] == label and r["scenario"] == scenario and r[kind]}

    for scenario in scenarios:
        bn = find("BN-adapt", scenario, "tuned")
        for arm in arms:
            kinds = ["tuned"]
            if arm.tuned and any(r["arm"] == arm.label and not r["tuned"] for r in runs):
                kinds.append("untuned")
            for kind in kinds:
                by_seed = find(arm.label, scenario, kind)
                if not by_seed:
                    continue
                base = find(arm.baseline, scenario, "tuned")
                first = by_seed[seeds[0]]
                shifts = list(first["shifts"])
                errors = [by_seed[s]["mean_error"] for s in seeds]
                row: dict[str, Any] = {
                    "scenario": scenario,
                    "arm": arm.label,
                    "lr": first["lr"],
                    "kind": kind if arm.tuned else "-",
                    "per_shift": {
                        sh: statistics.fmean(by_seed[s]["shifts"][sh]["error"] for s in seeds) for sh in shifts
                    },
                    "mean": mean_std(errors),
                }
                for name, ref in (("vs_bn_adapt", bn), ("vs_source", base)):
                    if ref and all(s in ref for s in seeds):
                        diffs = [by_seed[s]["mean_error"] - ref[s]["mean_error"] for s in seeds]
                        row[name] = {"mean_std": mean_std(diffs), "better": sum(d < 0 for d in diffs), "n": len(diffs)}
                sel = [v["selected"] for s in seeds for v in by_seed[s]["shifts"].values() if v["selected"] is not None]
                row["selected"] = statistics.fmean(sel) if sel else None
                for key in ("entropy", "below_e0", "below_tau_ent"):
                    row[key] = statistics.fmean(v[key] for s in seeds for v in by_seed[s]["shifts"].values())
                for key in ("msp_auroc", "selected_known", "selected_unknown"):
                    values = [v[key] for s in seeds for v in by_seed[s]["shifts"].values() if key in v]
                    if values:
                        row[key] = statistics.fmean(values)
                row["resets"] = statistics.fmean(sum(v["resets"] for v in by_seed[s]["shifts"].values()) for s in seeds)
                row["top_class_share_max"] = max(
                    v["top_class_share"] for s in seeds for v in by_seed[s]["shifts"].values()
                )
                if "clean_error_after" in first:
                    row["clean_error_after"] = mean_std([by_seed[s]["clean_error_after"] for s in seeds])
                rows.append(row)
    return rows


def pct(value: float) -> str:
    return f"{100 * value:5.1f}"


def print_quality(rows: list[dict], lrs: dict[str, Any], seeds: int) -> None:
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    titles = {
        "mild": f"mild: one stream per shift, severity {SEVERITY}, reset per shift",
        "continual": f"continual: all shifts in sequence, severity {CONTINUAL_SEVERITY}, never reset",
        "label shift": f"label shift: class-sorted streams, severity {SEVERITY}, reset per shift",
        "open-set": f"open-set: sources know digits 0-{KNOWN - 1}, the mild streams hold all 10; error on the known",
        "mild sev 5": f"mild at severity {CONTINUAL_SEVERITY}, reset per shift",
    }
    for scenario in scenarios:
        sub = [r for r in rows if r["scenario"] == scenario]
        shifts = list(sub[0]["per_shift"])
        extra = scenario == "continual"
        open_set = scenario == "open-set"
        print(f"\n{titles.get(scenario, scenario)}: online error %, mean over {seeds} seed(s)")
        header = (
            f"{'arm':<10} {'lr':>6} | "
            + " ".join(f"{SHORT.get(s, s[:5]):>5}" for s in shifts)
            + f" | {'mean ± std':>12} | {'Δ BN-adapt ± std win':>20} | {'Δ source':>8} | "
            + f"{'H':>4} {'<E0 %':>5} | {'sel %':>5} | "
            + f"{'resets':>6} | {'top %':>5}"
            + (f" | {'clean after':>11}" if extra else "")
            + (f" | {'AUROC':>5} | {'sel known/unknown %':>19}" if open_set else "")
        )
        print(header)
        print("-" * len(header))
        for r in sub:
            lr = "-" if r["lr"] is None else f"{r['lr']:.0e}" + ("*" if r["kind"] == "tuned" else " ")
            mean, std = r["mean"]
            cells = " ".join(pct(v) for v in r["per_shift"].values())
            if "vs_bn_adapt" in r and r["arm"] != "BN-adapt":
                d, ds = r["vs_bn_adapt"]["mean_std"]
                vs_bn = f"{100 * d:+6.1f} ± {100 * ds:4.1f} {r['vs_bn_adapt']['better']:>2}/{r['vs_bn_adapt']['n']:<2}"
            else:
                vs_bn = f"{'':>20}"
            vs_src = f"{100 * r['vs_source']['mean_std'][0]:+8.1f}" if "vs_source" in r else f"{'':>8}"
            sel = "    -" if r["selected"] is None else pct(r["selected"])
            line = (
                f"{r['arm']:<10} {lr:>6} | {cells} | {pct(mean)} ± {100 * std:4.1f} | {vs_bn} | {vs_src} | "
                f"{r['entropy']:4.2f} {pct(r['below_e0'])} | {sel} | "
                f"{r['resets']:6.1f} | {pct(r['top_class_share_max'])}"
            )
            if extra:
                c, cs = r["clean_error_after"]
                line += f" | {pct(c)} ± {100 * cs:3.1f}"
            if open_set:
                known, unknown = r.get("selected_known"), r.get("selected_unknown")
                sel_ku = f"{pct(known)} / {pct(unknown)}" if known is not None else "-"
                line += f" | {r['msp_auroc']:5.3f} | {sel_ku:>19}"
            print(line)
    print(
        "\nlr: * = chosen on the validation shifts; the other row of a method is the untuned lr 1e-3. Δ: paired "
        "difference of the mean error in points (negative = better), mean ± std over seeds; win = seeds better than "
        "BN-adapt. Δ source: vs the same model without adaptation. H: mean entropy (nats) of the pre-update "
        "predictions; <E0 %: samples with H < E0 = 0.4 ln C. sel %: samples in the loss. resets: recovery "
        "resets per seed (per-shift resets not counted). top %: largest share of one predicted class in a shift. "
        "AUROC: max-softmax probability separating known from unknown digits; sel known/unknown: share of each "
        "that the method put in its loss."
    )


def print_lrs(lrs: dict[str, Any], corruptions: Corruptions) -> None:
    where = f"{', '.join(corruptions.val_shifts)} at severity {corruptions.val_severity}"
    print(f"\nlr selection on {where} (mild): mean online error %")
    grid = [float(lr) for lr in next(iter(lrs.values()))["val_error_mean"]]
    header = (
        f"{'arm':<10} | {f'lr {grid[0]:.0e}':>8} | "
        + " | ".join(f"{f'lr {lr:.0e} (Δ ± std)':>24}" for lr in grid[1:])
        + " | chosen"
    )
    print(header)
    print("-" * len(header))
    for label, entry in lrs.items():
        base = entry["val_error_per_seed"][f"{grid[0]:g}"]
        cells = [f"{pct(entry['val_error_mean'][f'{grid[0]:g}']):>8}"]
        for lr in grid[1:]:
            diff = mean_std([a - b for a, b in zip(entry["val_error_per_seed"][f"{lr:g}"], base, strict=True)])
            mean = entry["val_error_mean"][f"{lr:g}"]
            cells.append(f"{pct(mean):>8} ({100 * diff[0]:+5.1f} ± {100 * diff[1]:4.1f})")
        print(f"{label:<10} | " + " | ".join(cells) + f" | {entry['chosen']:.0e}")
    print("Δ: paired difference from the first lr, points, mean ± std over seeds.")


def notes(rows: list[dict]) -> list[str]:
    """Automatic flags of the adapting arms, one line per (arm, lr, flag) listing the scenarios:
    low selection, recovery resets, worse in every seed, collapse onto one class."""
    found: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["lr"] is None:
            continue
        tag = f"{r['arm']} lr {r['lr']:.0e}"
        flags = []
        if r["selected"] is not None and r["selected"] < 0.05:
            flags.append(("selects < 5% of the samples", f"{100 * r['selected']:.1f}%"))
        if r["resets"] > 0:
            flags.append(("recovery resets per seed", f"{r['resets']:.1f}"))
        for key, name in (("vs_bn_adapt", "BN-adapt"), ("vs_source", "its source model")):
            vs = r.get(key)
            if vs and vs["better"] == 0 and vs["mean_std"][0] > 0.03:
                flags.append((f"worse than {name} in every seed", f"{100 * vs['mean_std'][0]:+.1f} points"))
        if r["top_class_share_max"] > 0.5 and r["scenario"] != "label shift":
            flags.append(("one class takes > 50% of a shift's predictions", f"{100 * r['top_class_share_max']:.0f}%"))
        for flag, value in flags:
            found.setdefault((tag, flag), []).append(f"{r['scenario']} {value}")
    return [f"{tag}: {flag}: {', '.join(where)}" for (tag, flag), where in found.items()]


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 shifts, 3 batches per shift (~1 minute)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="source training epochs (default 15; quick 6)")
    parser.add_argument(
        "--lr-grid", type=float, nargs="+", default=list(LR_GRID), help="lr candidates (default 1e-3 1e-2)"
    )
    parser.add_argument("--sev5", action="store_true", help="add the mild scenario at severity 5")
    parser.add_argument(
        "--corruptions",
        choices=("digits-c", "torch"),
        default="digits-c",
        help="digits-C (imagecorruptions, needs entreg[corruptions]) or entreg's 5 torch stand-ins",
    )
    parser.add_argument("--no-vit", action="store_true", help="leave out the ViT (its training is the slowest)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    add_cache_argument(parser, "tta")
    parser.add_argument("--out", type=Path, default=results_path(__file__), help="JSON output path")
    args = parser.parse_args(argv)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    epochs = args.epochs if args.epochs is not None else (6 if args.quick else EPOCHS)
    corruptions = DIGITS_C if args.corruptions == "digits-c" else TORCH_SHIFTS
    shifts = ["gaussian_noise", "contrast"] if args.quick else list(corruptions.shifts)
    max_batches = 3 if args.quick else None
    sev5 = args.sev5 and not args.quick
    norms = ("batch", "group") if args.no_vit or args.quick else ("batch", "group", "vit")
    if min(n_seeds, epochs, args.threads) < 1:
        parser.error("--seeds, --epochs and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    quiet_libraries("selected no sample", "`Trainer.fit` stopped", "no `val_dataloader`", "does not have many workers")

    report: dict[str, Any] = {
        "benchmark": "test-time adaptation on shifted digits: online error",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv),
        "settings": {
            "quick": args.quick,
            "seeds": list(range(n_seeds)),
            "source": {
                "backbone": "small_cnn",
                "widths": WIDTHS,
                "epochs": epochs,
                "optimizer": f"AdamW(lr={TRAIN_LR}, weight_decay={WEIGHT_DECAY}), cosine",
                "trainer": "lightning Trainer.fit of ClassificationModule",
            },
            "batch": BATCH,
            "shifts": shifts,
            "corruptions": corruptions.backend,
            "severity": SEVERITY,
            "continual_severity": CONTINUAL_SEVERITY,
            "severity5": sev5,
            "vit": {"backbone": "vit_tiny_patch16_224", **VIT, **VIT_RECIPE} if "vit" in norms else None,
            "open_set": {"known": list(range(KNOWN)), "norms": OPEN_SET_NORMS},
            "max_batches_per_shift": max_batches,
            "lr_grid": args.lr_grid,
            "validation": {"shifts": corruptions.val_shifts, "severity": corruptions.val_severity},
            "untuned_lr": UNTUNED_LR,
            "fisher": {"batches": FISHER_BATCHES, "batch": FISHER_BATCH, "data": "clean validation split"},
            "thresholds": {
                "e0": 0.4 * math.log(NUM_CLASSES),
                "deyo_tau_ent": 0.5 * math.log(NUM_CLASSES),
                "deyo_tau_plpd": 0.2,
                "eata_d_margin": 0.05,
                "sar_recovery_threshold": 0.2,
            },
            "path": "entreg.callbacks.tta_benchmark.run_stream (TestTimeAdaptation in trainer.test)",
        },
    }
    print(
        f"bench_tta: torch {torch.__version__}, {torch.get_num_threads()} threads, quick={args.quick}, "
        f"seeds={n_seeds}, epochs={epochs}",
        flush=True,
    )
    started = time.perf_counter()
    data = load_digits()
    arms = [arm for arm in ARMS if arm.norm in norms]

    print("\nsource models ...", flush=True)
    seeds: dict[int, SeedData] = {}
    infos = []
    for seed in range(n_seeds):
        sources = {}
        wanted = [(norm, NUM_CLASSES) for norm in norms] + [(norm, KNOWN) for norm in OPEN_SET_NORMS]
        for norm, classes in wanted:
            key = norm if classes == NUM_CLASSES else f"{norm} open"
            sources[key], info = source_model(data, norm, seed, epochs, args.cache_dir, classes)
            infos.append(info)
            how = "cached" if info["cached"] else f"trained in {info['seconds']:.1f} s"
            print(f"  {key:<10} seed {seed}: clean test acc {100 * info['clean_test_acc']:.1f}% ({how})", flush=True)
        seeds[seed] = seed_data(data, corruptions, sources, seed, shifts, sev5, max_batches)
    report["sources"] = infos

    t0 = time.perf_counter()
    print("\nlr selection ...", flush=True)
    lrs = select_lrs(arms, seeds, tuple(args.lr_grid))
    report["lr_selection"] = lrs
    print(f"  done in {time.perf_counter() - t0:.1f} s\nstreams ...", flush=True)
    runs = run_quality(arms, seeds, lrs)
    rows = summarise(runs, arms)
    report["quality"] = {"runs": runs, "summary": rows, "notes": notes(rows)}
    report["quality_seconds"] = time.perf_counter() - t0
    report["seconds_total"] = time.perf_counter() - started

    accs: dict[str, list[float]] = {}
    for info in infos:
        key = info["norm"] + ("" if info["classes"] == NUM_CLASSES else f" (digits 0-{KNOWN - 1})")
        accs.setdefault(key, []).append(info["clean_test_acc"])
    print(
        f"\nSource models (batch/group: small_cnn widths {WIDTHS}, {epochs} epochs; vit: {VIT}, "
        f"{VIT_RECIPE['epochs']} epochs): clean test accuracy (known classes), mean ± std over {n_seeds} seed(s)"
    )
    for norm, values in accs.items():
        m, s = mean_std(values)
        print(f"  {norm}: {100 * m:.1f} ± {100 * s:.1f}%  (per seed: {', '.join(f'{100 * v:.1f}' for v in values)})")
    print_lrs(report["lr_selection"], corruptions)
    print_quality(report["quality"]["summary"], report["lr_selection"], n_seeds)
    if report["quality"]["notes"]:
        print("\nFlags:")
        for line in report["quality"]["notes"]:
            print(f"  - {line}")
    args.out.write_text(json.dumps(compact(report), indent=1, default=float) + "\n")
    print(f"\nWrote {args.out} ({report['seconds_total']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
