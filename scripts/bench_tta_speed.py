"""Speed of test-time adaptation through entreg's path against the same method in a plain loop: images/s of Tent,
EATA, SAR and DeYO on ResNet-50 at 224 px.

What is compared, per method, on the same model, the same images and the same batches:

* ``entreg``: what ``entreg-adapt ... protocol=continual`` runs, :func:`entreg.callbacks.tta_benchmark.run_stream`:
  the protocol's stream (:mod:`entreg.tta.protocols`, its loaders from :mod:`entreg.tta.stream_loader`) through
  :class:`entreg.callbacks.TestTimeAdaptation` inside ``trainer.test``, the online error recorded per batch;
* ``plain``: a plain PyTorch loop, ``logits, _ = method.adapt(x)`` batch after batch over the same tensors, counting
  the errors (the least a user would write).

The model is a :class:`entreg.modules.PretrainedClassifier` around torchvision's ``resnet50`` (random weights: speed
does not depend on them; the normalisation inside the model as entreg-adapt runs it), inputs in [0, 1]. Timed: the
adaptation of the whole stream (``entreg``: from the start of the test loop to its end, the method built and EATA's
Fisher computed before; ``plain``: the loop, after building the method and its Fisher); also reported: the whole
``run_stream`` call with the Trainer's start. Both must give the same online error (checked on the CPU).

Repeats: each repeat runs every arm once, in an order rotated every repeat, and measures the CPU other processes
used meanwhile (``benchkit.ForeignCpu``); a repeat counts as clean when that stayed under ``--max-foreign-cores``.
Reported: the median over clean repeats (all, marked NOISY, when fewer than 3 were clean) of the ratio
entreg / plain in images/s, per method. Goal: >= 0.95.

Run (from the repository root; on a quiet machine, nothing else running):
    PYTHONPATH=. python scripts/bench_tta_speed.py                   # ResNet-50, 224 px, 3 batches of 64, 5 repeats
    PYTHONPATH=. python scripts/bench_tta_speed.py --device cuda     # on a GPU
    PYTHONPATH=. python scripts/bench_tta_speed.py --tiny            # resnet18, 64 px, 2 batches of 8: checks it runs

Writes ``bench_tta_speed.json`` in ``results/`` (``--out``; ``--tiny`` writes nothing unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from benchkit import ForeignCpu, clean_or_all, environment, quantile, quiet_libraries, results_path, verdict
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.callbacks.tta_benchmark import run_stream
from entreg.modules.pretrained import PretrainedClassifier
from entreg.tta import METHODS, Stream, build_method, protocol

GOAL = 0.95
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# ImageNet-C settings of the references: SGD lr 2.5e-4 at batch 64 (SAR's small-batch rule for SAR and DeYO)
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "tent": {"lr": 2.5e-4, "lr_scaling": "linear"},
    "eata": {"lr": 2.5e-4, "lr_scaling": "linear", "d_margin": 0.05, "fisher_alpha": 2000.0},
    "sar": {"lr": 2.5e-4, "lr_scaling": "sar"},
    "deyo": {"lr": 2.5e-4, "lr_scaling": "sar", "plpd_threshold": 0.3},
}
FISHER_BATCHES = 2


class Domain(NamedTuple):
    name: str
    dataset: Dataset
    corruption: str
    severity: int


def make_model(arch: str, size: int) -> PretrainedClassifier:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, weights=None)
    return PretrainedClassifier(net, {"input_size": (3, size, size), **IMAGENET}, num_classes=1000).eval()


def make_data(n: int, size: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g))


def entreg_arm(method: str, model: nn.Module, stream: Stream, source: Dataset, device: str, out: dict) -> Callable:
    """``run_stream`` of ``method``; records the loop's seconds, the whole call's and the online error."""
    options = dict(METHOD_OPTIONS[method])
    if METHODS[method].uses_source_data:
        options["source_batches"] = FISHER_BATCHES

    def trainer(callbacks: list[L.Callback], log: bool) -> L.Trainer:
        return L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=callbacks)  # fmt: skip

    def run() -> None:
        start = time.perf_counter()
        result = run_stream(copy.deepcopy(model), stream, TestTimeAdaptation(method, **options), trainer, source,
                            seed=0, source_batch_size=stream.segments[0].batch_size)  # fmt: skip
        (segment,) = result["segments"].values()
        out.update(seconds=result["extra"]["seconds"], call=time.perf_counter() - start, error=segment["error"])

    return run


def plain_arm(method: str, model: nn.Module, stream: Stream, source: Dataset, device: str, out: dict) -> Callable:
    """The same method in a plain loop over the same batches (the method and its Fisher built untimed)."""
    (segment,) = stream.segments
    x, y = (t[segment.indices] for t in segment.dataset.tensors)
    options = {k: v for k, v in METHOD_OPTIONS[method].items()}

    def run() -> None:
        start = time.perf_counter()
        tta = build_method(method, copy.deepcopy(model).to(device), 1000, **options)
        if tta.uses_source_data:
            tta.prepare([b.to(device) for b in source.tensors[0].split(segment.batch_size)[:FISHER_BATCHES]])
        torch.manual_seed(0)
        if device == "cuda":
            torch.cuda.synchronize()
        loop = time.perf_counter()
        wrong = 0
        with torch.no_grad():  # as the test loop runs; adapt turns gradients on itself
            for xb, yb in zip(x.split(segment.batch_size), y.split(segment.batch_size), strict=True):
                logits, _ = tta.adapt(xb.to(device))
                wrong += int((logits.argmax(1) != yb.to(device)).sum())
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        out.update(seconds=end - loop, call=end - start, error=wrong / len(y))

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_OPTIONS), choices=list(METHOD_OPTIONS))
    parser.add_argument("--arch", default="resnet50", help="torchvision model (default resnet50)")
    parser.add_argument("--size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="batches in the stream (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats wanted clean (default 5)")
    parser.add_argument("--max-repeats", type=int, default=None, help="repeats at most (default 2 x --repeats)")
    parser.add_argument("--max-foreign-cores", type=float, default=0.2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="resnet18, 64 px, 2 batches of 8, 2 repeats")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.arch, args.size, args.batch_size, args.batches, args.repeats = "resnet18", 64, 8, 2, 2
    out_path = args.out or (None if args.tiny else results_path(__file__))
    torch.set_num_threads(args.threads)
    quiet_libraries("selected no sample", "does not have many workers")

    model = make_model(args.arch, args.size)
    data = make_data(args.batch_size * args.batches, args.size, seed=1)
    stream = protocol("continual", severities=None).build([Domain("random", data, "random", 5)], args.batch_size)
    source = make_data(args.batch_size * FISHER_BATCHES, args.size, seed=2)
    images = len(data)
    arms: dict[str, Callable] = {}
    measured: dict[str, dict] = {}
    for method in args.methods:
        for kind, make in (("entreg", entreg_arm), ("plain", plain_arm)):
            measured[f"{method}/{kind}"] = {}
            arms[f"{method}/{kind}"] = make(method, model, stream, source, args.device, measured[f"{method}/{kind}"])
    print(f"bench_tta_speed: {args.arch} {args.size} px, {args.batches} batches of {args.batch_size}, "
          f"{args.device}, {torch.get_num_threads()} threads; warm-up ...", flush=True)  # fmt: skip
    errors = {}
    for name, run in arms.items():  # warm-up, untimed; both paths must adapt alike
        run()
        errors[name] = measured[name]["error"]
    mismatch = [m for m in args.methods if abs(errors[f"{m}/entreg"] - errors[f"{m}/plain"]) > 1e-9]
    if mismatch and args.device == "cpu":
        raise RuntimeError(f"entreg's path and the plain loop adapted differently ({mismatch}): {errors}")

    monitor, log = ForeignCpu(), []
    names = list(arms)
    max_repeats = args.max_repeats or 2 * args.repeats
    while len(log) < max_repeats and sum(rep["clean"] for rep in log) < args.repeats:
        k = len(log) % len(names)
        order = names[k:] + names[:k]
        seconds, calls, foreign = {}, {}, {}
        for name in order:
            start = monitor.snapshot()
            arms[name]()
            foreign[name] = monitor.cores(start, monitor.snapshot())
            seconds[name], calls[name] = measured[name]["seconds"], measured[name]["call"]
        worst = max((v for v in foreign.values() if v is not None), default=None)
        log.append({"order": order, "seconds": seconds, "call_seconds": calls, "foreign_cores": foreign,
                    "clean": worst is None or worst <= args.max_foreign_cores})  # fmt: skip
        print(f"  repeat {len(log)}: " + ", ".join(f"{n} {images / s:.2f}/s" for n, s in seconds.items()), flush=True)

    used, noisy = clean_or_all(log, [rep["clean"] for rep in log], args.repeats)
    results: dict[str, Any] = {}
    print(f"\nimages/s, median over {len(used)} repeats ({sum(r['clean'] for r in log)} of {len(log)} clean)")
    print(f"{'method':<6} | {'entreg':>8} | {'plain':>8} | {'ratio [IQR]':>22} | {'with Trainer start':>18} | goal")
    for method in args.methods:
        ratios = [rep["seconds"][f"{method}/plain"] / rep["seconds"][f"{method}/entreg"] for rep in used]
        whole = [rep["call_seconds"][f"{method}/plain"] / rep["call_seconds"][f"{method}/entreg"] for rep in used]
        speed = {kind: images / statistics.median(rep["seconds"][f"{method}/{kind}"] for rep in used)
                 for kind in ("entreg", "plain")}  # fmt: skip
        ratio = statistics.median(ratios)
        results[method] = {
            "images_per_second": speed,
            "ratio": ratio,
            "ratio_iqr": [quantile(ratios, 0.25), quantile(ratios, 0.75)],
            "ratios": ratios,
            "ratio_with_trainer_start": statistics.median(whole),
            "online_error": {kind: errors[f"{method}/{kind}"] for kind in ("entreg", "plain")},
            "verdict": verdict(ratio >= GOAL, noisy),
        }
        r = results[method]
        print(f"{method:<6} | {speed['entreg']:8.2f} | {speed['plain']:8.2f} | {ratio:6.3f} "
              f"[{r['ratio_iqr'][0]:5.3f}, {r['ratio_iqr'][1]:5.3f}] | {r['ratio_with_trainer_start']:18.3f} | "
              f">= {GOAL}: {r['verdict']}")  # fmt: skip
    report = environment(
        benchmark="test-time adaptation speed: entreg's path (run_stream, TestTimeAdaptation in trainer.test) vs a "
        "plain loop of the same method",
        settings={k: getattr(args, k) for k in ("arch", "size", "batch_size", "batches", "device", "methods")}
        | {"repeats": args.repeats, "max_foreign_cores": args.max_foreign_cores, "method_options": METHOD_OPTIONS},
        results=results,
        repeat_log=log,
    )
    if out_path is not None:
        out_path.write_text(__import__("json").dumps(report, indent=1, default=float) + "\n")
        print(f"Wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
