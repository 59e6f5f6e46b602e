"""Test-time adaptation on shifted digits: online error of Tent, ETA, EATA, OSTTA, SAR and DeYO, and their cost.

A CPU benchmark of the scenarios the reference implementations run on ImageNet-C (Tent, EATA, SAR, DeYO;
below), at a smaller scale.

Data, "digits-C" (default): the 597 test digits of the fixed split (data seed 0), upsampled to 32x32,
under ImageNet-C's 15 corruptions from ``imagecorruptions-imaug`` (``pip install entreg[corruptions]``),
generated once per (corruption, severity, noise seed) and cached with a sha256 by
:class:`entreg.data.DigitsCCache` (``~/.cache/entreg/digits_c``). ImageNet-C's constants at 32 px: the
numbers are comparable with nothing published. ``--corruptions torch`` uses entreg's five torch
stand-ins (:func:`entreg.data.shifts.apply_shift`) instead.

Sources, trained from scratch on the clean 1000-image training split (1 channel) by a plain loop,
batch 64, no augmentation, the training seed being the benchmark seed; weights cached in
``.cache/bench/tta/`` (git-ignored; ``--cache-dir``) by settings and seed; their clean test accuracy is
reported:

* ``small_cnn`` (``widths=(16, 32, 64)``, half the width of ``configs/backbone/small_cnn.yaml``) with
  BatchNorm, and the same network with GroupNorm: the recipe of ``configs/model/classifier.yaml``
  (AdamW lr 3e-3, weight decay 5e-4, cosine schedule), 15 epochs;
* a 12-block timm ViT (``vit_tiny_patch16_224`` narrowed to width 64, 2 heads, 8x8 patches; 0.6 M
  parameters), AdamW lr 3e-3, weight decay 0.05, cosine, 40 epochs: the LayerNorm path of SAR/DeYO
  (``--no-vit`` leaves it out);
* for the open-set scenario, the two CNNs again, trained on the digits 0-7 only (8 outputs).

Streams, identical for every method (paired), batch 64 (the last batch of each corruption holds 21);
the noise of each corruption and the order of the samples are drawn from the benchmark seed.
Scenarios:

* ``mild``: each corruption at severity 3 a stream of its own, the method reset between them;
* ``continual``: the 15 corruptions at severity 5 one after the other, never reset (EATA's and
  CoTTA's continual setting); afterwards the error of the adapted model on the clean test set (no
  update) measures forgetting;
* ``label shift``: the mild streams sorted by class (SAR's imbalanced scenario), reset per corruption;
* ``open-set``: the mild streams (all 10 digits) seen by the sources that know 0-7: online error on the
  known digits, the AUROC of the max-softmax probability for known vs unknown, and the share of known
  and of unknown samples each method put in its loss (from :attr:`entreg.tta.StepInfo.mask`);
* ``mild sev 5``: as ``mild`` at severity 5 (``--sev5`` adds it).

Arms: ``source`` (no adaptation, BatchNorm running statistics), ``BN-adapt`` (batch statistics
through :func:`entreg.tta.norm.force_batch_statistics`, no update), Tent, ETA, EATA (Fisher on 8 batches
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

Metrics: online error (argmax of the logits from *before* each update, the papers' measure) per
shift and its mean; per seed, the paired difference from BN-adapt and from the same model's source
(mean ± sample std over seeds, and in how many seeds the method was better); the fraction of samples
selected for the loss; the number of SAR-style recovery resets; the share of the most predicted
class (collapse). With 597 test images a binomial standard error is ~1.9 points at 30% error:
differences under ~3 points mean nothing unless they hold in every seed.

Speed (single process, ``--threads`` threads; every figure a ratio measured side by side):

(a) callback overhead: ``trainer.test(module, loader)`` with ``TestTimeAdaptation("tent")`` against a
plain loop over the same loader calling ``method.adapt(x)`` then ``module(x)`` (what the module's
``test_step`` does with the adapted model) and counting errors, under ``torch.no_grad`` as the test
loop is. Method construction is inside both timings, Trainer construction in neither. The two must
give the same online error (checked). Also timed, without TTA: ``trainer.test`` vs a plain
``module(x)`` loop, which is Lightning's own share (its test loop and the module's metrics), and the
ratio of what TTA adds in each, (lightning+tta - lightning) / (plain+tta - plain), which is the
callback's own share. Goal: TTA/plain <= 1.10.

(b) cost per batch of each method relative to Tent, plain loop, same model and batches (the first 4
batches of every shift at severity 3: DeYO's second forward sees only its confident samples, so its
cost depends on the data): goals DeYO <=
1.7x and SAR <= 2.2x (BatchNorm model; on the GroupNorm model Tent is replaced by entropy
minimisation of all norm layers, ``Tent`` with SAR/DeYO's parameter set). Forward calls (and the
samples they see, in batches) and backward passes per batch are counted with hooks.

In both, each repeat runs all arms in an order rotated every repeat, measures the CPU that other
processes used meanwhile (``benchkit.ForeignCpu``), and keeps a repeat for the statistics only when
that stayed under ``--max-foreign-cores``; medians over >= ``--repeats`` clean repeats (NOISY when
fewer were clean).

Run (from the repository root):
    PYTHONPATH=. python scripts/bench_tta.py             # full: 3 seeds, ~40 minutes on 2 cores
    PYTHONPATH=. python scripts/bench_tta.py --quick     # 1 seed, 2 shifts, 3 batches each: < 1 minute
    PYTHONPATH=. python scripts/bench_tta.py --seeds 5 --out tta_5seeds.json

Writes ``bench_tta.json`` in ``results/`` (``--out``): settings, versions, every per-seed number.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchkit import ForeignCpu, add_cache_argument, quantile, quiet_libraries, results_path, shown
from torch import Tensor, nn

from entreg.data.digits import DigitsDataModule
from entreg.data.digits_c import DigitsCCache, corruption_names
from entreg.data.shifts import SHIFTS
from entreg.entropy import categorical_entropy
from entreg.modules.classification import ClassificationModule
from entreg.tta import StepInfo, Tent, TTAMethod, build_method
from entreg.tta.norm import ALL_NORMS, SAR_EXCLUDE, SAR_EXCLUDE_NAMES, force_batch_statistics

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
GOAL_CALLBACK = 1.10
GOALS_COST = {"deyo": 1.7, "sar": 2.2}
MIN_CLEAN = 3
SHORT = {"gaussian_noise": "gauss", "impulse_noise": "impul", "contrast": "contr", "brightness": "brigh"}
SHORT["gaussian_blur"] = "blur"


@dataclass(frozen=True)
class Arm:
    """One row: ``method`` is ``source``, ``bn_adapt`` or a name of :data:`entreg.tta.METHODS`."""

    label: str
    method: str
    norm: str  # "batch", "group" or "vit": which source model
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def tuned(self) -> bool:
        return self.method not in ("source", "bn_adapt")

    @property
    def baseline(self) -> str:
        """Label of the same model's source row."""
        return {"batch": "source", "group": "source GN", "vit": "source ViT"}[self.norm]


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


class EntropyAllNorms(Tent, register=False):
    """Tent's loss on SAR/DeYO's parameter set (all norm layers): the cost baseline on GroupNorm models."""

    name = "tent_all_norms"
    norm_types = ALL_NORMS
    exclude = SAR_EXCLUDE
    exclude_names = SAR_EXCLUDE_NAMES


def compact(value: Any) -> Any:
    """``value`` with every float rounded to 6 significant digits (a smaller JSON, nothing lost that matters)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    return value


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Data and source models
# ----------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One shift of a stream: its batches (normalised images, labels)."""

    shift: str
    batches: list[tuple[Tensor, Tensor]]


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
    tuple(corruption_names("imagecorruptions")[:15]),  # ImageNet-C's 15 test corruptions
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


def shifted_sets(
    data: Digits, cache: DigitsCCache, shifts: list[str], severity: int, seed: int
) -> tuple[dict[str, Tensor], Tensor]:
    """Every shift of the test images (normalised; shift k drawn with seed ``seed + k``, cached), and a
    permutation per shift drawn from ``seed``."""
    images, labels = data.test
    clean = (images[:, 0] * data.std + data.mean).clamp(0, 1)
    sets = {}
    for k, shift in enumerate(shifts):
        shifted = torch.from_numpy(cache.get(clean, shift, severity, seed=seed + 1000 * k)).float()
        if shifted.max() > 1.5:  # digits-C is uint8
            shifted = shifted / 255
        sets[shift] = ((shifted - data.mean) / data.std).unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(len(labels), generator=g) for _ in shifts])
    return sets, orders


def make_segments(
    sets: dict[str, Tensor], orders: Tensor, labels: Tensor, class_sorted: bool, max_batches: int | None
) -> list[Segment]:
    segments = []
    for (shift, x), order in zip(sets.items(), orders, strict=True):
        if class_sorted:  # by label; within a class in the shuffled order
            order = order[torch.argsort(labels[order], stable=True)]
        xs, ys = x[order], labels[order]
        batches = [(xs[i : i + BATCH], ys[i : i + BATCH]) for i in range(0, len(ys), BATCH)]
        segments.append(Segment(shift, batches[:max_batches]))
    return segments


def build_module(norm: str, classes: int = NUM_CLASSES) -> ClassificationModule:
    if norm == "vit":
        return ClassificationModule("vit_tiny_patch16_224", classes, 1, backbone_kwargs=VIT)
    return ClassificationModule("small_cnn", classes, 1, backbone_kwargs={"widths": WIDTHS, "norm": norm})


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float(torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(y), 256)]).eq(y).float().mean())


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
    module = build_module(norm, classes)
    start = time.perf_counter()
    cached = path.is_file()
    if cached:
        module.backbone.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(seed)
        module = build_module(norm, classes)
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        g = torch.Generator().manual_seed(seed)
        x, y = data.train
        x, y = x[y < classes], y[y < classes]
        module.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), BATCH):
                idx = order[i : i + BATCH]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(module(x[idx]), y[idx]).backward()
                optimizer.step()
            schedule.step()
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(module.backbone.state_dict(), partial)
        os.replace(partial, path)  # atomic: a concurrent run never reads half a file
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
# Online error of one arm on one stream
# ----------------------------------------------------------------------------------------------


class Runner:
    """One arm on a copy of a source model: predict-then-adapt per batch, reset to the source."""

    def __init__(self, arm: Arm, source: nn.Module, lr: float, fisher_data: list[Tensor]) -> None:
        self.model = copy.deepcopy(source).eval()
        self.method: TTAMethod | None = None
        if arm.method == "bn_adapt":
            force_batch_statistics(self.model)
        elif arm.method != "source":
            classes = self.model.hparams["num_classes"]
            self.method = build_method(arm.method, self.model, classes, lr=lr, **dict(arm.kwargs))
            if arm.method == "eata":
                self.method.set_fishers(fisher_data)

    def step(self, x: Tensor) -> tuple[Tensor, StepInfo | None]:
        if self.method is None:
            with torch.no_grad():
                return self.model(x), None
        return self.method.adapt(x)

    def reset(self) -> None:
        if self.method is not None:
            self.method.reset()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)


def auroc(known: Tensor, unknown: Tensor) -> float:
    """P(score of a known sample > score of an unknown one), ties counting half (Mann-Whitney)."""
    ranks = torch.cat([known, unknown]).double().argsort().argsort().double() + 1
    scores = torch.cat([known, unknown])
    for value in scores.unique():  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n1, n2 = len(known), len(unknown)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def run_stream(runner: Runner, segments: list[Segment], reset_each: bool) -> dict[str, dict[str, Any]]:
    """Online error etc. per shift; ``reset_each``: back to the source before every shift.

    Labels the model does not know (>= its number of classes: the open-set scenario) are left out of the
    error; for them the result adds the share of known and unknown samples the method selected and the
    AUROC of the max-softmax probability for telling them apart (from the pre-update logits)."""
    out: dict[str, dict[str, Any]] = {}
    for i, segment in enumerate(segments):
        if i and reset_each:
            runner.reset()
        wrong = seen = selected = total = resets = 0
        entropy_sum, low = 0.0, torch.zeros(2)
        counts = None
        chosen = torch.zeros(2)  # selected (known, unknown)
        msp: list[Tensor] = []
        known_flags: list[Tensor] = []
        for x, y in segment.batches:
            logits, info = runner.step(x)
            classes = logits.shape[1]
            known = y < classes
            pred = logits.argmax(1)
            wrong += int((pred != y)[known].sum())
            seen += int(known.sum())
            counts = torch.bincount(pred, minlength=classes) + (0 if counts is None else counts)
            h = categorical_entropy(logits.detach(), dim=1)
            entropy_sum += float(h.sum())
            e0, tau_ent = 0.4 * math.log(classes), 0.5 * math.log(classes)  # the thresholds of this model
            low += torch.stack([(h < e0).sum(), (h < tau_ent).sum()]).float()
            msp.append(logits.detach().softmax(1).amax(1))
            known_flags.append(known)
            if info is not None:
                selected, total, resets = selected + info.selected, total + info.total, resets + int(info.reset)
                if info.mask is not None:
                    chosen += torch.stack([(info.mask & known).sum(), (info.mask & ~known).sum()]).float()
        n = sum(len(k) for k in known_flags)
        out[segment.shift] = {
            "error": wrong / seen,
            "selected": selected / total if total else None,
            "resets": resets,
            "top_class_share": float(counts.max()) / n,
            "entropy": entropy_sum / n,
            "below_e0": float(low[0]) / n,
            "below_tau_ent": float(low[1]) / n,
        }
        if seen < n:  # open set
            flags, scores = torch.cat(known_flags), torch.cat(msp)
            out[segment.shift]["msp_auroc"] = auroc(scores[flags], scores[~flags])
            if total:
                out[segment.shift]["selected_known"] = float(chosen[0]) / seen
                out[segment.shift]["selected_unknown"] = float(chosen[1]) / (n - seen)
    return out


def clean_error(runner: Runner, data: Digits, seed: int) -> float:
    """Error of the (adapted) model on the clean test set in shuffled batches, without updates."""
    x, y = data.test
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    wrong = sum(
        int((runner.predict(x[i : i + BATCH]).argmax(1) != y[i : i + BATCH]).sum()) for i in range(0, len(y), BATCH)
    )
    return wrong / len(y)


@dataclass
class Scenario:
    """A stream: its segments, whether the method is reset between them, and whether the sources are the
    open-set ones (trained on the digits below :data:`KNOWN`)."""

    segments: list[Segment]
    reset_each: bool
    open_set: bool = False


@dataclass
class SeedData:
    """Everything one seed needs: sources (by norm; ``"<norm> open"`` for the open-set ones), Fisher
    batches, the streams of every scenario."""

    sources: dict[str, nn.Module]
    fisher: list[Tensor]
    scenarios: dict[str, Scenario]
    validation: list[Segment]


def seed_data(
    data: Digits,
    corruptions: Corruptions,
    sources: dict[str, nn.Module],
    seed: int,
    shifts: list[str],
    sev5: bool,
    max_batches: int | None,
) -> SeedData:
    labels = data.test[1]
    cache = DigitsCCache(backend=corruptions.backend)
    sets, orders = shifted_sets(data, cache, shifts, SEVERITY, 10_000 * (seed + 1))
    mild = make_segments(sets, orders, labels, False, max_batches)
    sets5, orders5 = shifted_sets(data, cache, shifts, CONTINUAL_SEVERITY, 10_000 * (seed + 1) + 500)
    mild5 = make_segments(sets5, orders5, labels, False, max_batches)
    scenarios = {
        "mild": Scenario(mild, True),
        "continual": Scenario(mild5, False),
        "label shift": Scenario(make_segments(sets, orders, labels, True, max_batches), True),
        "open-set": Scenario(mild, True, open_set=True),
    }
    if sev5:
        scenarios["mild sev 5"] = Scenario(mild5, True)
    val_sets, val_orders = shifted_sets(
        data, cache, list(corruptions.val_shifts), corruptions.val_severity, 10_000 * (seed + 1) + 700
    )
    validation = make_segments(val_sets, val_orders, labels, False, max_batches)
    x_val = data.val[0]
    fisher = [x_val[i * FISHER_BATCH : (i + 1) * FISHER_BATCH] for i in range(FISHER_BATCHES)]
    return SeedData(sources, fisher, scenarios, validation)


def select_lrs(arms: list[Arm], seeds: dict[int, SeedData], grid: tuple[float, ...]) -> dict[str, Any]:
    """Per tuned arm, the lr of ``grid`` with the lowest mean online error on the validation shifts."""
    result: dict[str, Any] = {}
    for arm in arms:
        if not arm.tuned:
            continue
        errors: dict[float, list[float]] = {}
        for lr in grid:
            for seed, sd in seeds.items():
                torch.manual_seed(seed)  # DeYO's patch shuffle draws from the global generator
                runner = Runner(arm, sd.sources[arm.norm], lr, sd.fisher)
                stream = run_stream(runner, sd.validation, reset_each=True)
                errors.setdefault(lr, []).append(statistics.fmean(s["error"] for s in stream.values()))
        means = {lr: statistics.fmean(v) for lr, v in errors.items()}
        chosen = min(grid, key=lambda lr: (means[lr], lr))
        result[arm.label] = {"chosen": chosen, "val_error_mean": {f"{lr:g}": means[lr] for lr in grid}}
        result[arm.label]["val_error_per_seed"] = {f"{lr:g}": errors[lr] for lr in grid}
    return result


def run_quality(arms: list[Arm], seeds: dict[int, SeedData], data: Digits, lrs: dict[str, Any]) -> list[dict]:
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
                for scenario, stream in sd.scenarios.items():
                    source = sd.sources.get(f"{arm.norm} open" if stream.open_set else arm.norm)
                    if source is None:
                        continue
                    torch.manual_seed(seed)
                    runner = Runner(arm, source, lr, sd.fisher)
                    start = time.perf_counter()
                    shifts = run_stream(runner, stream.segments, stream.reset_each)
                    run: dict[str, Any] = {
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
                    if scenario == "continual":
                        run["clean_error_after"] = clean_error(runner, data, seed)
                    runs.append(run)
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
# Speed
# ----------------------------------------------------------------------------------------------


def timed_repeats(
    arms: dict[str, Callable[[], Callable[[], None]]],
    repeats: int,
    max_repeats: int,
    max_foreign: float,
    deadline: float,
) -> list[dict[str, Any]]:
    """Each arm is ``prepare() -> run``; only ``run()`` is timed. Arms in rotated order per repeat."""
    monitor = ForeignCpu()
    names = list(arms)
    log: list[dict[str, Any]] = []
    while len(log) < max_repeats and sum(rep["clean"] for rep in log) < repeats:
        if len(log) >= MIN_CLEAN and time.perf_counter() > deadline:
            break
        k = len(log) % len(names)
        order = names[k:] + names[:k]
        if (len(log) // len(names)) % 2:
            order = order[::-1]
        seconds: dict[str, float] = {}
        foreign: dict[str, float | None] = {}
        for name in order:
            run = arms[name]()
            start = monitor.snapshot()
            t0 = time.perf_counter()
            run()
            seconds[name] = time.perf_counter() - t0
            foreign[name] = monitor.cores(start, monitor.snapshot())
        worst = max((v for v in foreign.values() if v is not None), default=None)
        log.append(
            {
                "order": order,
                "seconds": seconds,
                "foreign_cores": foreign,
                "clean": worst is None or worst <= max_foreign,
            }
        )
    return log


def ratio_stats(log: list[dict[str, Any]], num: str, den: str) -> dict[str, Any]:
    clean = [rep for rep in log if rep["clean"]]
    used = clean if len(clean) >= MIN_CLEAN else log
    ratios = [rep["seconds"][num] / rep["seconds"][den] for rep in used]
    extra = [rep["seconds"][num] - rep["seconds"][den] for rep in used]
    return {
        "median": statistics.median(ratios),
        "difference_s_median": statistics.median(extra),
        "iqr": [quantile(ratios, 0.25), quantile(ratios, 0.75)],
        "ratios": ratios,
        "seconds_median": {n: statistics.median(rep["seconds"][n] for rep in used) for n in (num, den)},
        "clean": len(clean),
        "run": len(log),
        "noisy": used is log and len(clean) < len(log),
    }


def increment_stats(log: list[dict[str, Any]]) -> dict[str, Any]:
    """What TTA adds under Lightning over what it adds to the plain loop, per repeat:
    (lightning+tta - lightning) / (plain+tta - plain): the callback's own share, Lightning's test loop left out."""
    clean = [rep for rep in log if rep["clean"]]
    used = clean if len(clean) >= MIN_CLEAN else log
    sec = [rep["seconds"] for rep in used]
    ratios = [(t["lightning+tta"] - t["lightning"]) / (t["plain+tta"] - t["plain"]) for t in sec]
    return {
        "median": statistics.median(ratios),
        "iqr": [quantile(ratios, 0.25), quantile(ratios, 0.75)],
        "ratios": ratios,
    }


def run_callback_speed(
    template: ClassificationModule, batches: list[tuple[Tensor, Tensor]], lr: float, args: argparse.Namespace
) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from entreg.callbacks import TestTimeAdaptation

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    online: dict[str, float] = {}  # the last online error of each TTA arm: both must adapt identically

    def lightning_arm(tta: bool) -> Callable[[], Callable[[], None]]:
        def prepare() -> Callable[[], None]:
            module = copy.deepcopy(template)
            callbacks = [TestTimeAdaptation("tent", num_classes=NUM_CLASSES, lr=lr)] if tta else []
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=callbacks,
            )

            def run() -> None:
                trainer.test(module, loader, verbose=False)
                if tta:
                    online["lightning+tta"] = callbacks[0].online_error()[0]

            return run

        return prepare

    def plain_arm(tta: bool) -> Callable[[], Callable[[], None]]:
        def prepare() -> Callable[[], None]:
            module = copy.deepcopy(template)

            def run() -> None:
                method = build_method("tent", module, NUM_CLASSES, lr=lr) if tta else None
                module.eval()
                wrong = 0
                with torch.no_grad():
                    for xb, yb in loader:
                        if method is not None:
                            logits, _ = method.adapt(xb)
                            wrong += int((logits.argmax(1) != yb).sum())
                        module(xb)
                if method is not None:
                    online["plain+tta"] = wrong / len(y)

            return run

        return prepare

    arms = {
        "lightning+tta": lightning_arm(True),
        "plain+tta": plain_arm(True),
        "lightning": lightning_arm(False),
        "plain": plain_arm(False),
    }
    for prepare in arms.values():  # warm-up, untimed
        prepare()()
    if abs(online["lightning+tta"] - online["plain+tta"]) > 1e-9:
        raise RuntimeError(f"the callback and the plain loop adapted differently: online errors {online}")
    deadline = time.perf_counter() + args.max_minutes * 60 / 2
    log = timed_repeats(arms, args.repeats, 2 * args.repeats, args.max_foreign_cores, deadline)
    return {
        "batches": len(loader),
        "method": "tent",
        "lr": lr,
        "online_error": online,
        "tta": ratio_stats(log, "lightning+tta", "plain+tta"),
        "no_tta": ratio_stats(log, "lightning", "plain"),
        "increment": increment_stats(log),
        "repeat_log": log,
    }


def count_passes(make: Callable[[], TTAMethod], batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Forward calls, forward samples (in batches) and backward passes per batch of a fresh method."""
    method = make()
    calls = {"forward": 0, "samples": 0, "backward": 0}

    def on_forward(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        calls["forward"] += 1
        calls["samples"] += len(inputs[0])

    def on_grad(grad: Tensor) -> None:
        calls["backward"] += 1

    handles = [method.model.register_forward_hook(on_forward), method.params[0].register_hook(on_grad)]
    frozen = getattr(method, "frozen", None)
    if isinstance(frozen, nn.Module):
        handles.append(frozen.register_forward_hook(on_forward))
    seen = 0
    for x, _ in batches:
        method.adapt(x)
        seen += len(x)
    for handle in handles:
        handle.remove()
    n = len(batches)
    return {
        "forward": calls["forward"] / n,
        "forward_batches": calls["samples"] / seen,
        "backward": calls["backward"] / n,
    }


def method_maker(name: str, source: nn.Module, fisher: list[Tensor], lr: float) -> Callable[[], TTAMethod]:
    """A factory of fresh methods ``name`` on copies of ``source``."""

    def make() -> TTAMethod:
        model = copy.deepcopy(source).eval()
        if name == "tent_all_norms":
            return EntropyAllNorms(model, NUM_CLASSES, lr=lr)
        method = build_method(name, model, NUM_CLASSES, lr=lr)
        if name == "eata":
            method.set_fishers(fisher)
        return method

    return make


def adapt_loop(make: Callable[[], TTAMethod], batches: list[tuple[Tensor, Tensor]]) -> Callable[[], Callable[[], None]]:
    """A timing arm: build a fresh method (untimed), then ``method.adapt`` over ``batches`` (timed)."""

    def prepare() -> Callable[[], None]:
        method = make()
        torch.manual_seed(0)

        def run() -> None:
            with torch.no_grad():
                for x, _ in batches:
                    method.adapt(x)

        return run

    return prepare


def run_method_cost(
    sources: dict[str, nn.Module],
    fisher: list[Tensor],
    batches: list[tuple[Tensor, Tensor]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    lr = UNTUNED_LR
    specs: dict[str, list[tuple[str, str]]] = {
        "batch": [
            ("tent", "tent"),
            ("eta", "eta"),
            ("eata", "eata"),
            ("ostta", "ostta"),
            ("sar", "sar"),
            ("deyo", "deyo"),
        ],
        "group": [("tent", "tent_all_norms"), ("sar", "sar"), ("deyo", "deyo")],
    }
    results: dict[str, Any] = {}
    for norm, arms_spec in specs.items():
        makers = {label: method_maker(name, sources[norm], fisher, lr) for label, name in arms_spec}
        arms = {label: adapt_loop(make, batches) for label, make in makers.items()}
        counts = {label: count_passes(make, batches) for label, make in makers.items()}
        for warm_up in arms.values():
            warm_up()()
        deadline = time.perf_counter() + args.max_minutes * 60 / 4
        log = timed_repeats(arms, args.repeats, 2 * args.repeats, args.max_foreign_cores, deadline)
        results[norm] = {
            "methods": {label: name for label, name in arms_spec},
            "ratios_vs_tent": {label: ratio_stats(log, label, "tent") for label, _ in arms_spec if label != "tent"},
            "ms_per_batch_median": {
                label: 1e3 * ratio_stats(log, label, "tent")["seconds_median"][label] / len(batches)
                for label, _ in arms_spec
            },
            "counts": counts,
            "repeat_log": log,
        }
    return {"batches": len(batches), "lr": lr, "by_model": results}


def print_speed(cb: dict[str, Any] | None, cost: dict[str, Any] | None) -> None:
    if cb is not None:
        print(
            f"\n(a) Callback overhead: trainer.test vs a plain loop, {cb['batches']} batches of {BATCH}, "
            f"Tent lr {cb['lr']:g} (online error {100 * cb['online_error']['plain+tta']:.2f}% in both)"
        )
        header = (
            f"{'arms':<28} | {'ratio [IQR]':>24} | {'s (Lightning)':>13} {'s (plain)':>9} {'+ms/batch':>9} | "
            f"{'clean':>5} | goal"
        )
        print(header)
        print("-" * len(header))
        for key, title, num, den in (
            ("tta", "TestTimeAdaptation / plain", "lightning+tta", "plain+tta"),
            ("no_tta", "no TTA: trainer.test / plain", "lightning", "plain"),
        ):
            s = cb[key]
            goal = ("PASS" if s["median"] <= GOAL_CALLBACK else "FAIL") if key == "tta" else "-"
            goal += " NOISY" if s["noisy"] else ""
            print(
                f"{title:<28} | {s['median']:7.3f} [{s['iqr'][0]:6.3f}, {s['iqr'][1]:6.3f}] | "
                f"{s['seconds_median'][num]:13.3f} {s['seconds_median'][den]:9.3f} "
                f"{1e3 * s['difference_s_median'] / cb['batches']:9.2f} | {s['clean']:>2}/{s['run']:<2} | {goal}"
            )
        inc = cb["increment"]
        print(
            f"{'TTA increment L / plain':<28} | {inc['median']:7.3f} [{inc['iqr'][0]:6.3f}, {inc['iqr'][1]:6.3f}] | "
            "(lightning+tta - lightning) / (plain+tta - plain): the callback's own share"
        )
        print("+ms/batch: median extra time of Lightning per batch.")
    if cost is not None:
        print(
            f"\n(b) Cost per batch relative to Tent, plain loop, {cost['batches']} batches of {BATCH}, "
            f"lr {cost['lr']:g}"
        )
        header = (
            f"{'model':<5} {'method':<6} | {'ms/batch':>8} | {'/tent [IQR]':>22} | {'fwd':>4} {'fwd batches':>11} "
            f"{'bwd':>4} | {'clean':>5} | goal"
        )
        print(header)
        print("-" * len(header))
        for norm, res in cost["by_model"].items():
            for label in res["methods"]:
                c = res["counts"][label]
                ms = res["ms_per_batch_median"][label]
                if label == "tent":
                    ratio, clean, goal = f"{1:7.3f}{'':>15}", "", "-"
                else:
                    s = res["ratios_vs_tent"][label]
                    ratio = f"{s['median']:7.3f} [{s['iqr'][0]:5.3f}, {s['iqr'][1]:5.3f}]"
                    clean = f"{s['clean']}/{s['run']}"
                    goal = "-"
                    if label in GOALS_COST:
                        goal = f"<= {GOALS_COST[label]}: " + ("PASS" if s["median"] <= GOALS_COST[label] else "FAIL")
                    goal += " NOISY" if s["noisy"] else ""
                name = "tent*" if res["methods"][label] == "tent_all_norms" else label
                print(
                    f"{norm[:5]:<5} {name:<6} | {ms:8.2f} | {ratio:>22} | "
                    f"{c['forward']:4.2f} {c['forward_batches']:11.2f} "
                    f"{c['backward']:4.2f} | {clean:>5} | {goal}"
                )
        print(
            "fwd: forward calls per batch (OSTTA's frozen copy included); fwd batches: samples forwarded / batch size; "
            "bwd: backward passes per batch. tent* (group): entropy minimisation of all norm layers (SAR/DeYO's set)."
        )


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 shifts, 3 batches per shift (< 1 minute)")
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
    parser.add_argument("--part", choices=("quality", "speed", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="clean timed repeats (default 7; quick 3)")
    parser.add_argument("--max-minutes", type=float, default=None, help="time budget of the timing (default 3)")
    parser.add_argument(
        "--max-foreign-cores",
        type=float,
        default=0.2,
        help="a repeat is clean if other processes used at most this many cores during every arm (default 0.2)",
    )
    add_cache_argument(parser, "tta")
    parser.add_argument("--out", type=Path, default=results_path(__file__), help="JSON output path")
    args = parser.parse_args(argv)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    epochs = args.epochs if args.epochs is not None else (6 if args.quick else EPOCHS)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    args.max_minutes = args.max_minutes if args.max_minutes is not None else (0.5 if args.quick else 3.0)
    corruptions = DIGITS_C if args.corruptions == "digits-c" else TORCH_SHIFTS
    shifts = ["gaussian_noise", "contrast"] if args.quick else list(corruptions.shifts)
    max_batches = 3 if args.quick else None
    sev5 = args.sev5 and not args.quick
    norms = ("batch", "group") if args.no_vit or args.quick else ("batch", "group", "vit")
    if min(n_seeds, epochs, args.repeats, args.threads) < 1:
        parser.error("--seeds, --epochs, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    quiet_libraries()

    report: dict[str, Any] = {
        "benchmark": "test-time adaptation on shifted digits: online error and cost",
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
            "part": args.part,
            "repeats": args.repeats,
            "max_foreign_cores": args.max_foreign_cores,
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

    if args.part in ("quality", "both"):
        t0 = time.perf_counter()
        print("\nlr selection ...", flush=True)
        lrs = select_lrs(arms, seeds, tuple(args.lr_grid))
        report["lr_selection"] = lrs
        print(f"  done in {time.perf_counter() - t0:.1f} s\nstreams ...", flush=True)
        runs = run_quality(arms, seeds, data, lrs)
        rows = summarise(runs, arms)
        report["quality"] = {"runs": runs, "summary": rows, "notes": notes(rows)}
        report["quality_seconds"] = time.perf_counter() - t0

    if args.part in ("speed", "both"):
        t0 = time.perf_counter()
        first = seeds[0]
        segments = first.scenarios["mild"].segments
        stream = [b for seg in segments for b in seg.batches]
        print(f"\n(a) timing the callback over {sum(len(b[1]) for b in stream)} shifted images ...", flush=True)
        report["callback_speed"] = run_callback_speed(first.sources["batch"], stream, UNTUNED_LR, args)
        per_shift = max(1, (6 if args.quick else 20) // len(segments))
        cost_batches = [b for seg in segments for b in seg.batches[:per_shift]]  # every shift: selection varies
        print(f"(b) timing the methods over {len(cost_batches)} batches ...", flush=True)
        report["method_cost"] = run_method_cost(first.sources, first.fisher, cost_batches, args)
        report["speed_seconds"] = time.perf_counter() - t0
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
    if "quality" in report:
        print_lrs(report["lr_selection"], corruptions)
        print_quality(report["quality"]["summary"], report["lr_selection"], n_seeds)
        if report["quality"]["notes"]:
            print("\nFlags:")
            for line in report["quality"]["notes"]:
                print(f"  - {line}")
    print_speed(report.get("callback_speed"), report.get("method_cost"))
    args.out.write_text(json.dumps(compact(report), indent=1, default=float) + "\n")
    print(f"\nWrote {args.out} ({report['seconds_total']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
