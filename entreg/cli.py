"""Hydra entry points. Configs live in the top-level ``configs/`` folder, installed as the
``entreg.configs`` package so that they are found from any install.

Every command checks its checkpoint paths (existence, kind: :mod:`entreg.checkpoint_kind`) and its numeric options
before building anything heavy, prints a results table and where its logs and checkpoints are, and writes
``metrics.json`` into its run directory, from which :class:`MultirunSummary` summarises a multirun.

Heavy imports (lightning, torch models) happen inside the functions so that ``--help`` is fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from entreg.checkpoint_kind import require_kind

if TYPE_CHECKING:
    import lightning as L
    from torch import Tensor

CONFIG_PATH = "pkg://entreg.configs"
REPORTED_TEST_METRICS = {
    "test/acc": "accuracy",
    "test/nll": "NLL",
    "test/ece": "ECE",
    "test/entropy_mean": "mean entropy (nats)",
}
METRICS_FILE = "metrics.json"
_DATALOADER_KEY = re.compile(r"(.+)/dataloader_idx_(\d+)")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group made of named ``_target_`` nodes (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(node, _convert_="all") for node in cfg.values() if node is not None and "_target_" in node]


# ---- checks before anything heavy is built ---------------------------------------------------------------------


def existing_file(value: Any, key: str) -> Path:
    """``value`` as the path of an existing file; FileNotFoundError naming ``key`` otherwise."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"{key}={value}: no such file{where}")
    return path


def _last_activity(run: Path) -> float:
    """When ``run`` last wrote anything (the newest modification time in it)."""
    return max((path.stat().st_mtime for path in run.rglob("*") if path.is_file()), default=run.stat().st_mtime)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path`` to resume from: None, an existing file, or ``last``: ``checkpoints/last.ckpt`` of the newest
    run of ``cfg.task_name`` under ``cfg.paths.log_dir`` (the one that wrote last; this run excluded), printed. If
    that run has no checkpoint (stopped before its first), FileNotFoundError says so and names the newest run that
    has one, instead of silently resuming another run."""
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if str(value) != "last":
        return str(existing_file(value, "ckpt_path"))
    runs_dir = Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
    this_run = Path(str(cfg.paths.output_dir)).resolve()
    runs = [run for run in runs_dir.glob("*") if run.is_dir() and run.resolve() != this_run]
    runs.sort(key=lambda run: (_last_activity(run), run.name), reverse=True)
    last = [run / "checkpoints" / "last.ckpt" for run in runs]
    found = [path for path in last if path.is_file()]
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no run of {cfg.task_name} has a last checkpoint (looked for "
            f"{runs_dir / '*' / 'checkpoints' / 'last.ckpt'}); pass the checkpoint's path as ckpt_path=<path>"
        )
    if found[0] != last[0]:
        raise FileNotFoundError(
            f"ckpt_path=last: the newest run of {cfg.task_name}, {runs[0]}, has no checkpoint (it stopped before "
            f"writing one); the newest run that has one is {found[0].parents[1]}: to resume it, pass "
            f"ckpt_path={found[0]}"
        )
    say(f"ckpt_path=last: resuming the newest run of {cfg.task_name} from {found[0]}")
    return str(found[0])


def require_positive_ints(cfg: DictConfig, *keys: str) -> None:
    """ValueError naming the key unless every ``cfg[key]`` is an integer >= 1."""
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


# ---- trainer ---------------------------------------------------------------------------------------------------


def make_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any], fit: bool = False) -> L.Trainer:
    """The ``cfg.trainer`` Trainer. SyncBatchNorm runs on CUDA GPUs only: a config that asks for it
    (``trainer=ddp``) where the accelerator is or resolves to the CPU runs on the CPU without it, with a warning.
    ``trainer.enable_progress_bar=false`` drops the progress bar callbacks. A trainer that will ``fit``
    gets an :class:`~entreg.callbacks.InterruptCheckpoint` (unless it has one): Ctrl-C, SIGTERM or a preemption
    signal writes ``<run>/checkpoints/last.ckpt`` and stops."""
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities import rank_zero_warn

    from entreg.callbacks import InterruptCheckpoint

    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    if options.get("enable_progress_bar") is False:
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    if fit and not any(isinstance(callback, InterruptCheckpoint) for callback in callbacks):
        callbacks = [*callbacks, InterruptCheckpoint()]
    accelerator = options.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if options.get("sync_batchnorm") and on_cpu:
        rank_zero_warn(
            "trainer.sync_batchnorm=true needs CUDA GPUs (SyncBatchNorm does not run on the CPU) and this run is on "
            "the CPU: running with trainer.accelerator=cpu trainer.sync_batchnorm=false (set both to silence this)"
        )
        options |= {"accelerator": "cpu", "sync_batchnorm": False}
    return instantiate(options, callbacks=callbacks, logger=loggers or False, _convert_="all")


def logger_dirs(loggers: Sequence[Any]) -> dict[str, str]:
    """``{"TensorBoard logs": <dir>, ...}`` for the loggers that write to a directory."""
    named = {
        f"{type(logger).__name__.removesuffix('Logger')} logs": getattr(logger, "log_dir", None) for logger in loggers
    }
    return {label: str(Path(path)) for label, path in named.items() if path}


def run_paths(cfg: DictConfig, trainer: L.Trainer) -> dict[str, str]:
    """Where a run wrote: its directory, each logger's directory and the checkpoint callback's checkpoints."""
    paths = {"run directory": str(cfg.paths.output_dir), **logger_dirs(trainer.loggers)}
    callback = trainer.checkpoint_callback
    if callback is None:
        paths["checkpoints"] = "none (no ModelCheckpoint callback)"
        return paths
    paths["best checkpoint"] = callback.best_model_path or "none written"
    if callback.save_last:
        # a fit launched in worker processes (ddp_fork/spawn) tells this process the best path only: look on disk
        on_disk = Path(str(callback.dirpath or "")) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        last = callback.last_model_path or (str(on_disk) if callback.dirpath and on_disk.is_file() else "")
        paths["last checkpoint"] = last or "none written"
    return paths


def run_fit(trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit``; Lightning's own stop on SIGTERM (``SIGTERMException``) becomes
    :class:`~entreg.callbacks.TrainingInterrupted` with the checkpoint the InterruptCheckpoint wrote."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from entreg.callbacks import InterruptCheckpoint, TrainingInterrupted

    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException as stop:
        saved = [c.saved for c in trainer.callbacks if isinstance(c, InterruptCheckpoint) and c.saved is not None]
        raise TrainingInterrupted(signal.SIGTERM, saved[0] if saved else None) from stop


# ---- reporting -------------------------------------------------------------------------------------------------


def _on_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def say(*lines: str) -> None:
    """Print ``lines`` as they are (no markup, long paths unwrapped), on rank zero only."""
    from rich.console import Console

    if _on_rank_zero():
        console = Console(highlight=False)
        for line in lines:
            console.print(line, soft_wrap=True, markup=False)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], paths: Mapping[str, str]) -> None:
    """Print a table (floats to 4 decimals, None as "-") titled ``title``, then ``paths`` as ``label: path`` lines,
    on rank zero only."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if not _on_rank_zero():
        return
    table = Table(title=Text(title))
    for i, column in enumerate(header):
        table.add_column(Text(column), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row))
    Console().print(table)
    say(*(f"{label}: {path}" for label, path in paths.items()))


def write_metrics(output_dir: Any, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` to ``output_dir/metrics.json`` (read by :class:`MultirunSummary`)."""
    path = Path(str(output_dir)) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics), indent=2) + "\n")
    return path


def by_dataloader(metrics: Mapping[str, Any]) -> list[dict[str, float]]:
    """The metrics of each test dataloader under plain names (``test/acc/dataloader_idx_1`` -> ``test/acc`` of the
    second), or ``[metrics]`` when none carries a dataloader suffix."""
    split: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        if match := _DATALOADER_KEY.fullmatch(key):
            split.setdefault(int(match[2]), {})[match[1]] = float(value)
    if not split:
        return [{key: float(value) for key, value in metrics.items()}]
    return [split.get(i, {}) for i in range(max(split) + 1)]


def dataloader_names(datamodule: Any, count: int) -> list[str]:
    """Names of ``count`` test dataloaders: the datamodule's ``shifts`` (``mixed`` for a mixed stream) where it has
    one per dataloader, else ``dataloader i`` (``value`` for a single one)."""
    shifts = ["mixed"] if getattr(datamodule, "mixed", False) else list(getattr(datamodule, "shifts", None) or [])
    if len(shifts) == count:
        return shifts
    return ["value"] if count == 1 else [f"dataloader {i}" for i in range(count)]


# ---- entreg-train ----------------------------------------------------------------------------------------------


def require_trainable_model(cfg: DictConfig) -> None:
    """Raise ValueError, naming ``entreg-adapt``, when ``cfg.model._target_`` builds a LightningModule without a
    ``training_step`` (a pretrained source model of test-time adaptation, ``configs/model/timm_pretrained.yaml``
    and the like); checked on the class, before anything is built."""
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_object

    target = (cfg.get("model") or {}).get("_target_")
    built = get_object(target) if target else None
    owner = getattr(built, "__self__", built)  # a classmethod builder's class
    if isinstance(owner, type) and issubclass(owner, L.LightningModule):
        if owner.training_step is L.LightningModule.training_step:
            choice = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
            given = f"model={choice}" if choice else f"model._target_={target}"
            raise ValueError(
                f"{given} cannot be trained: {owner.__name__} has no training step (a pretrained source model for "
                f"test-time adaptation); use it with entreg-adapt {given if choice else 'model=...'} stream=... "
                "protocol=... method=... (configs/protocol, configs/method)"
            )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data`` (resuming from ``cfg.ckpt_path``: a file or ``last``), test the best
    checkpoint unless ``cfg.test`` is false, and return the metrics: the test metrics (with several test dataloaders,
    ``test/acc/<shift>`` per dataloader), else every logged metric. Prints them, one column per test dataloader, and
    where the logs and checkpoints are; writes them to ``metrics.json``. A model that cannot train (an
    ``entreg-adapt`` source model) is refused first (:func:`require_trainable_model`)."""
    import lightning as L
    from hydra.utils import instantiate

    require_trainable_model(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer = make_trainer(cfg, callbacks, loggers, fit=True)
    run_fit(trainer, model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    paths = run_paths(cfg, trainer)  # before test() restores the best checkpoint's callback states
    if cfg.get("test", True):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        loaders = by_dataloader({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        names = dataloader_names(datamodule, len(loaders))
        metrics = loaders[0]
        if len(loaders) > 1:  # test/acc/<shift>
            metrics = {f"{k}/{name}": v for name, d in zip(names, loaders, strict=True) for k, v in d.items()}
        title, header = f"entreg {cfg.task_name}: test results", ["metric", *names]
        rows = [[label, *(d.get(key) for d in loaders)] for key, label in REPORTED_TEST_METRICS.items()]
    else:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        progress = getattr(model, "training_progress", None)  # RL agents log against env steps
        metrics.setdefault("step", float(progress[0] if progress is not None else trainer.global_step))
        title, header = f"entreg {cfg.task_name}: final metrics", ["metric", "value"]
        rows = [[name, value] for name, value in sorted(metrics.items())]
    if trainer.is_global_zero:
        paths["metrics"] = str(write_metrics(cfg.paths.output_dir, metrics))
        print_table(title, header, [row for row in rows if any(v is not None for v in row[1:])], paths)
    return metrics


# ---- entreg-adapt ----------------------------------------------------------------------------------------------


def adapt(cfg: DictConfig) -> dict[str, float]:
    """Test-time adaptation with ``cfg.method``. With ``cfg.protocol``: a benchmark (:func:`adapt_benchmark`);
    without: the classifier checkpoint ``cfg.ckpt_path`` on the digits streams (:func:`adapt_checkpoint`)."""
    if cfg.get("protocol") is not None:
        return adapt_benchmark(cfg)
    if cfg.get("model") is not None:
        raise ValueError("entreg-adapt model=...: choose a protocol too, e.g. protocol=continual (configs/protocol)")
    return adapt_checkpoint(cfg)


def adapt_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Load the classifier checkpoint ``cfg.ckpt_path`` and adapt it on ``cfg.stream`` with ``cfg.method``. Per shift:
    the source accuracy, the online accuracy during adaptation and the adapted test accuracy, logged to the loggers as
    ``adapt/<shift>/{source,online,adapted}_acc``, printed with the run's paths and images/s (of the adapted test run),
    and returned as ``<shift>/<name>``."""
    if cfg.get("ckpt_path") is None:
        raise ValueError(
            "entreg-adapt needs a source model: ckpt_path=<an entreg-train checkpoint> (digits streams), or "
            "model=<robustbench|timm_pretrained|torchvision_pretrained> stream=<benchmark> protocol=<protocol>"
        )
    ckpt_path = existing_file(cfg.ckpt_path, "ckpt_path")
    require_kind(ckpt_path, ["classifier"], "entreg-adapt ckpt_path", allow_other=True)

    import time

    import lightning as L
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.callbacks import LambdaCallback

    from entreg.loggers import log_metrics

    L.seed_everything(cfg.seed, workers=True)
    model_class = get_class(cfg.model_class)
    datamodule = instantiate(cfg.stream, _convert_="all")

    def test(callbacks: list, loggers: list) -> L.Trainer:
        trainer = make_trainer(cfg, callbacks, loggers)
        model = model_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
        trainer.test(model, datamodule=datamodule, verbose=False)
        return trainer

    source = by_dataloader(test([], []).callback_metrics) if cfg.compare_source else None
    tta = instantiate(cfg.method, _convert_="all")
    rows: dict[str, dict[str, float | None]] = {}

    def report(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        adapted, online = by_dataloader(trainer.callback_metrics), tta.online_error()
        for idx, shift in enumerate(dataloader_names(datamodule, len(adapted))):
            rows[shift] = {
                "source": source[idx].get("test/acc") if source else None,
                "online": 1 - online[idx] if idx in online else None,
                "adapted": adapted[idx].get("test/acc"),
            }
        values = {f"adapt/{s}/{k}_acc": v for s, row in rows.items() for k, v in row.items() if v is not None}
        log_metrics(trainer, values, step=0)

    start = time.perf_counter()
    trainer = test([tta, LambdaCallback(on_test_end=report)], instantiate_group(cfg.get("logger")))
    seconds = time.perf_counter() - start
    metrics = {f"{shift}/{k}": v for shift, row in rows.items() for k, v in row.items() if v is not None}
    images = sum(len(loader.dataset) for loader in datamodule.test_dataloader())
    if trainer.is_global_zero:
        paths = {"run directory": str(cfg.paths.output_dir), **logger_dirs(trainer.loggers)}
        paths["metrics"] = str(write_metrics(cfg.paths.output_dir, metrics))
        paths["checkpoint"] = f"{ckpt_path} (the source model; the adapted weights are not saved)"
        header = ["shift", "source acc", "online acc (pre-update)", "adapted acc"]
        table = [[shift, row["source"], row["online"], row["adapted"]] for shift, row in rows.items()]
        print_table(f"entreg-adapt {cfg.method.method} on {ckpt_path}", header, table, paths)
        say(f"adaptation: {images} images in {seconds:.1f} s, {images / seconds:.1f} images/s (the whole test run)")
    return metrics


# the options of a method config that every row of a benchmark shares (where the logits are, which submodule)
SHARED_TTA_OPTIONS = ("num_classes", "module", "output_key", "input_key", "target_key")


def benchmark_stream(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """``(protocol, datamodule, model)`` of a benchmark run: the stream loads the severities the protocol visits,
    the model gets the stream's class subset (ImageNet-R/A) and gives the stream its image transform (:func:`feed`)."""
    from hydra.utils import get_class, instantiate

    protocol = instantiate(cfg.protocol, _convert_="all")
    stream_options = {}
    if protocol.severities is not None and "severities" in cfg.stream:
        stream_options["severities"] = sorted(set(protocol.severities))
    datamodule = instantiate(cfg.stream, **stream_options, _convert_="all")
    if cfg.get("model") is not None and cfg.get("ckpt_path") is not None:
        raise ValueError("entreg-adapt: give the source model once, as model=<config> or as ckpt_path=<checkpoint>")
    subset = getattr(datamodule, "class_subset", None)
    if cfg.get("model") is not None:
        model = instantiate(cfg.model, **({"class_subset": subset} if subset is not None else {}), _convert_="all")
    elif cfg.get("ckpt_path") is not None:
        ckpt_path = existing_file(cfg.ckpt_path, "ckpt_path")
        require_kind(ckpt_path, ["classifier"], "entreg-adapt ckpt_path", allow_other=True)
        model = get_class(cfg.model_class).load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            "entreg-adapt protocol=...: give the source model, model=<robustbench|timm_pretrained|"
            "torchvision_pretrained> (with its weights file) or ckpt_path=<an entreg-train checkpoint>"
        )
    feed(datamodule, model)
    if not hasattr(datamodule, "domains"):
        raise ValueError(
            f"protocol={protocol.name} needs a benchmark stream with domains (stream=cifar10_c, cifar100_c, "
            f"imagenet_c, ...); {type(datamodule).__name__} has none (the digits streams run without a protocol)"
        )
    return protocol, datamodule, model


def feed(stream: Any, model: Any) -> None:
    """Give a benchmark stream the model's image transform (without the resize and crop where the stream's images are
    crops already, as ImageNet-C's) and set it up."""
    if hasattr(stream, "set_transform") and hasattr(model, "image_transform"):
        stream.set_transform(model.image_transform(resize=not getattr(stream, "cropped", False)))
    stream.setup("test")


def source_dataset(cfg: DictConfig, model: Any) -> Any:
    """``cfg.source_data`` (clean source samples, e.g. for EATA's Fisher information): a Dataset config, or a stream
    config (e.g. ``entreg.data.ImageFolderStream`` on ImageNet's validation images with ``n_examples: 2000``), whose
    domains' images then come through the model's transform; None without one."""
    from hydra.utils import instantiate
    from torch.utils.data import ConcatDataset

    if cfg.get("source_data") is None:
        return None
    source = instantiate(cfg.source_data, _convert_="all")
    if not hasattr(source, "domains"):
        return source
    feed(source, model)
    return ConcatDataset([domain.dataset for domain in source.domains])


def adapt_benchmark(cfg: DictConfig) -> dict[str, float]:
    """Adapt the source model (``cfg.model`` or ``cfg.ckpt_path``) on the benchmark stream ``cfg.stream`` under
    ``cfg.protocol`` with ``cfg.method``, after the rows ``cfg.baselines`` (``source``, ``bn_adapt``), every row on
    the same stream. Writes the standard table (online error per segment and the mean) as ``tta_table.csv`` and
    ``tta_table.json`` and ``metrics.json`` in the run directory, logs it to the loggers (``benchmark/<row>/...``)
    with the method's per-batch ``tta/*`` values, prints it with images/s, and returns ``<row>/<segment>/error``,
    ``<row>/mean_error`` and ``<row>/images_per_second``."""
    import lightning as L
    from hydra.utils import instantiate

    from entreg.callbacks import TestTimeAdaptation
    from entreg.callbacks.tta_benchmark import run_benchmark

    L.seed_everything(cfg.seed, workers=True)
    protocol, datamodule, model = benchmark_stream(cfg)
    options = datamodule.loader_options()
    stream = protocol.build(datamodule.domains, options["batch_size"], seed=cfg.seed)
    source = source_dataset(cfg, model)
    method = str(cfg.method.method)
    shared = {key: cfg.method[key] for key in SHARED_TTA_OPTIONS if cfg.method.get(key) is not None}
    rows = {name: (lambda name=name: TestTimeAdaptation(name, **shared)) for name in cfg.baselines if name != method}
    rows[method] = lambda: instantiate(cfg.method, _convert_="all")
    loggers = instantiate_group(cfg.get("logger"))

    def trainer(callbacks: list, log: bool) -> L.Trainer:
        return make_trainer(cfg, callbacks, loggers if log else [])

    table = run_benchmark(
        model, stream, rows, trainer, source, loader_options=options, log=lambda label: label == method, seed=cfg.seed
    )
    table.info |= {"stream": type(datamodule).__name__, "batch_size": stream.segments[0].batch_size, "seed": cfg.seed}
    metrics = table.scalars(prefix="")
    metrics |= {f"{label}/images_per_second": extra["images_per_second"] for label, extra in table.extra.items()}
    if not _on_rank_zero():
        return metrics
    for logger in loggers:
        logger.log_metrics(table.scalars(), step=0)
        logger.finalize("success")
    paths = {"run directory": str(cfg.paths.output_dir), **logger_dirs(loggers)}
    written = table.write(cfg.paths.output_dir)
    paths |= {"table (csv)": str(written["csv"]), "table (json)": str(written["json"])}
    paths["metrics"] = str(write_metrics(cfg.paths.output_dir, metrics))

    def cell(value: Any, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    header = [*table.header(), "images/s"]
    lines = [[*map(cell, row), cell(table.extra[row[0]]["images_per_second"], 1)] for row in table.error_rows()]
    title = f"entreg-adapt {method}, protocol {protocol.name} (reset: {stream.reset}): online error % (pre-update)"
    print_table(title, header, lines, paths)
    return metrics


# ---- entreg-sample ---------------------------------------------------------------------------------------------
def log_samples(cfg: DictConfig, metrics: dict[str, Any], grid: Tensor) -> dict[str, str]:
    """Log ``metrics`` (as ``sample/<name>``) and the image ``grid`` (TensorBoard ``sample/samples``) to the run's
    loggers; returns their directories."""
    from lightning.pytorch.loggers import TensorBoardLogger

    paths: dict[str, str] = {}
    for logger in instantiate_group(cfg.get("logger")):
        logger.log_metrics({f"sample/{name}": float(value) for name, value in metrics.items()}, step=0)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("sample/samples", grid, 0)
        logger.finalize("success")
        paths |= logger_dirs([logger])
    return paths


def sample(cfg: DictConfig) -> dict[str, float]:
    """Load the DiffusionModule checkpoint ``cfg.ckpt_path``, draw ``cfg.n`` samples with ``cfg.sampler`` in
    ``cfg.num_inference_steps`` steps; write ``samples.png`` and ``metrics.json`` to ``cfg.paths.output_dir`` and
    the image and metrics (``sample/*``) to ``cfg.logger`` (TensorBoard there by default); print and return the
    metrics (against ``cfg.data``'s validation split when a data config is given). With ``cfg.pipeline`` (a diffusers
    pipeline directory) it samples the pipeline instead (:func:`sample_pipeline_dir`)."""
    if cfg.get("pipeline") is not None:
        return sample_pipeline_dir(cfg)
    require_positive_ints(cfg, "n", "num_inference_steps", "nrow")
    if cfg.sampler.scheduler is None:
        raise ValueError("sampler=pipeline (a pipeline's own scheduler) needs pipeline=<a diffusers pipeline dir>")
    ckpt_path = existing_file(cfg.ckpt_path, "ckpt_path")
    require_kind(ckpt_path, ["diffusion"], "entreg-sample ckpt_path")

    import time

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from torchvision.utils import save_image

    from entreg.images import sample_grid
    from entreg.modules.diffusion import DiffusionModule

    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data, _convert_="all") if cfg.get("data") else None
    reference = instantiate(cfg.reference_mixture) if cfg.get("reference_mixture") else None
    if reference is None:
        reference = getattr(datamodule, "mixture", None)
    extractor = instantiate(cfg.feature_extractor) if cfg.get("feature_extractor") else None
    model = DiffusionModule.load_checkpoint(
        ckpt_path, map_location=cfg.device, feature_extractor=extractor, reference_mixture=reference
    )
    model = model.to(cfg.device).eval()
    scheduler = model.make_scheduler(cfg.sampler.scheduler, **cfg.sampler.options)
    start = time.perf_counter()
    samples = model.sample(cfg.n, scheduler, cfg.num_inference_steps, torch.Generator().manual_seed(cfg.seed))
    seconds = time.perf_counter() - start
    samples = samples.float().cpu()
    metrics = {"n": cfg.n, "num_inference_steps": cfg.num_inference_steps, "seconds": seconds}
    metrics |= {"finite_fraction": float(torch.isfinite(samples).flatten(1).all(1).float().mean())}
    if datamodule is not None:
        datamodule.setup("validate")
        real = torch.stack([datamodule.val_set[i][0] for i in range(min(cfg.n, len(datamodule.val_set)))])
        metrics |= model.sample_metrics(samples, real)
    output_dir = Path(str(cfg.paths.output_dir))
    grid = sample_grid(model.to_image(samples) if samples.ndim == 4 else samples, cfg.nrow)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_image(grid, output_dir / "samples.png")
    paths = {"samples": str(output_dir / "samples.png")}
    paths["metrics"] = str(
        write_metrics(output_dir, {"ckpt_path": str(ckpt_path), "sampler": cfg.sampler.scheduler, **metrics})
    )
    paths |= log_samples(cfg, metrics, grid)
    paths["checkpoint"] = str(ckpt_path)
    title = f"entreg-sample {cfg.sampler.scheduler} on {ckpt_path}"
    print_table(title, ["metric", "value"], list(metrics.items()), paths)
    return metrics


def sample_pipeline_dir(cfg: DictConfig) -> dict[str, float]:
    """Sample the diffusers pipeline in the directory ``cfg.pipeline`` (``from_pretrained``, no downloads): one image
    per prompt of ``cfg.prompts`` (a text file, one prompt a line, or a list) and seed of ``cfg.seeds`` (a list, or
    a count n: seeds 0 to n - 1), in
    ``cfg.num_inference_steps`` steps of ``cfg.sampler`` built from the pipeline's scheduler config
    (:func:`entreg.diffusion.pipelines.pipeline_scheduler`; ``sampler=pipeline``: its own scheduler), with
    ``cfg.guidance_scale``, ``cfg.height``, ``cfg.width`` (null: the pipeline's defaults). Writes the images
    (``images/<prompt index>_<seed>.png``), their grid ``samples.png`` (also to TensorBoard) and ``metrics.json``
    (seconds per image, NFE = model calls per image); prints and returns the metrics."""
    require_positive_ints(cfg, "num_inference_steps", "nrow")
    seeds = cfg.get("seeds")
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0 else seeds
    if not seeds or isinstance(seeds, (str, int)) or not all(type(seed) is int for seed in seeds):
        raise ValueError(f"seeds must be a count >= 1 (seeds 0..n-1) or a list of integers, got {cfg.get('seeds')!r}")
    seeds = list(seeds)
    if cfg.get("prompts") is None:
        raise ValueError(
            "entreg-sample pipeline=... needs prompts=<a text file, one prompt a line> or prompts='[a cat]'"
        )

    import statistics

    from omegaconf import OmegaConf
    from torchvision.utils import save_image

    from entreg.diffusion.pipelines import (
        load_pipeline,
        pipeline_scheduler,
        read_prompts,
        sample_pipeline,
        scheduler_class,
    )
    from entreg.images import sample_grid

    prompts = cfg.prompts if isinstance(cfg.prompts, str) else OmegaConf.to_container(cfg.prompts)
    prompts = read_prompts(prompts)
    if cfg.sampler.scheduler is not None:
        scheduler_class(cfg.sampler.scheduler)  # a wrong name fails before the weights are loaded
    pipeline = load_pipeline(cfg.pipeline, cfg.get("torch_dtype")).to(cfg.device)
    pipeline.set_progress_bar_config(disable=True)
    options = OmegaConf.to_container(cfg.sampler.options) if cfg.sampler.get("options") else {}
    scheduler = pipeline_scheduler(pipeline, cfg.sampler.scheduler, **options)
    images, records = sample_pipeline(
        pipeline, prompts, seeds, cfg.num_inference_steps, scheduler=scheduler, guidance_scale=cfg.guidance_scale,
        height=cfg.height, width=cfg.width,
    )  # fmt: skip
    output_dir = Path(str(cfg.paths.output_dir))
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    for k, (image, record) in enumerate(zip(images, records, strict=True)):
        record["file"] = f"images/{k // len(seeds):03d}_{record['seed']}.png"
        save_image(image, output_dir / record["file"])
    grid = sample_grid(images, cfg.nrow)
    save_image(grid, output_dir / "samples.png")
    seconds = [r["seconds"] for r in records]
    metrics = {
        "images": len(records), "num_inference_steps": cfg.num_inference_steps,
        "nfe": statistics.mean(r["nfe"] for r in records), "seconds_per_image": statistics.mean(seconds),
        "seconds_per_image_median": statistics.median(seconds),
    }  # fmt: skip
    paths = {"images": str(output_dir / "images"), "samples": str(output_dir / "samples.png")}
    sampler = type(scheduler).__name__
    paths["metrics"] = str(
        write_metrics(
            output_dir,
            {
                "pipeline": str(cfg.pipeline),
                "scheduler": sampler,
                "scheduler_config": json.loads(scheduler.to_json_string()),
            }
            | metrics
            | {"per_image": records},
        )
    )
    paths |= log_samples(cfg, metrics, grid)
    print_table(f"entreg-sample {sampler} on {cfg.pipeline}", ["metric", "value"], list(metrics.items()), paths)
    return metrics


# ---- entreg-finetune -------------------------------------------------------------------------------------------


def finetune(cfg: DictConfig) -> dict[str, float]:
    """GRPO fine-tuning of the FlowMatchingModule checkpoint ``cfg.base_checkpoint`` with ``cfg.reward`` and the
    ``cfg.grpo`` variant (resuming from ``cfg.ckpt_path``: a GRPO checkpoint or ``last``); prints the base and the
    fine-tuned evaluation (reward, path-KL, ``cfg.eval_metrics``) and where the logs and checkpoints are, writes
    ``metrics.json`` and returns the final evaluation as ``eval/*``. With ``cfg.pipeline`` (a diffusers pipeline
    directory) and ``cfg.prompts`` it fine-tunes the pipeline's transformer instead (:func:`finetune_pipeline`)."""
    if cfg.get("pipeline") is not None:
        return finetune_pipeline(cfg)
    if cfg.get("base_checkpoint") is None:
        raise ValueError(
            "entreg-finetune needs base_checkpoint=<a FlowMatchingModule checkpoint>, or pipeline=<a diffusers "
            "pipeline directory> prompts=<a prompt file>"
        )
    base_checkpoint = existing_file(cfg.base_checkpoint, "base_checkpoint")
    require_kind(base_checkpoint, ["flow"], "entreg-finetune base_checkpoint")
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        require_kind(ckpt_path, ["grpo"], "entreg-finetune ckpt_path")

    import lightning as L
    from hydra.utils import instantiate

    from entreg.modules.grpo import GRPOModule

    L.seed_everything(cfg.seed, workers=True)
    reward = instantiate(cfg.reward, _convert_="all")
    eval_metrics = instantiate(cfg.eval_metrics, _convert_="all") if cfg.get("eval_metrics") else None
    options = instantiate(cfg.grpo, _convert_="all")
    model = GRPOModule.from_flow_checkpoint(
        base_checkpoint, reward, eval_metrics=eval_metrics, seed=cfg.seed, **options
    )
    return fit_and_report(cfg, model, ckpt_path, f"entreg-finetune {cfg.grpo.variant}: base -> fine-tuned")


def fit_and_report(
    cfg: DictConfig, model: Any, ckpt_path: str | None, title: str, exports: Any = None
) -> dict[str, float]:
    """Evaluate ``model`` (a GRPO module), fit it, evaluate it again; on rank zero write ``metrics.json``, call
    ``exports(model, output_dir) -> {name: path}`` (files the run writes) and print base vs fine-tuned with the
    cost counters. Returns the final evaluation as ``eval/*``."""
    before = model.evaluate()
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer = make_trainer(cfg, callbacks, loggers, fit=True)
    run_fit(trainer, model, ckpt_path=ckpt_path, weights_only=True)
    after = model.to(trainer.strategy.root_device).evaluate()
    metrics = {f"eval/{k}": v for k, v in after.items()}
    if trainer.is_global_zero:
        paths = run_paths(cfg, trainer)
        if exports is not None:
            paths |= exports(model, Path(cfg.paths.output_dir))
        paths["metrics"] = str(write_metrics(cfg.paths.output_dir, metrics))
        rows = [[name, before.get(name), value] for name, value in after.items()]
        rows += [[name, None, value] for name, value in model.cost.items()]
        print_table(title, ["metric", "base", "fine-tuned"], rows, paths)
    return metrics


def finetune_pipeline(cfg: DictConfig) -> dict[str, float]:
    """GRPO fine-tuning of the transformer of the diffusers pipeline in ``cfg.pipeline`` (SD3, FLUX) on the prompts
    of ``cfg.prompts`` with ``cfg.reward`` (a reward on images and prompts), the ``cfg.grpo`` variant and the
    ``cfg.t2i`` options (:class:`entreg.modules.grpo_pipeline.GRPOPipelineModule`); resumes from ``cfg.ckpt_path`` (a
    GRPOPipelineModule checkpoint or ``last``).
    Writes the adapter in diffusers' LoRA format to ``<run>/lora`` (``cfg.export_pipeline``: also the merged
    pipeline to ``<run>/pipeline``), prints base vs fine-tuned evaluation and returns it as ``eval/*``."""
    pipeline = Path(str(cfg.pipeline)).expanduser()
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(f"pipeline={cfg.pipeline}: no diffusers pipeline there (no model_index.json)")
    if cfg.get("prompts") is None:
        raise ValueError("entreg-finetune pipeline=... needs prompts=<a prompt file: one per line, or a table>")
    prompts = existing_file(cfg.prompts, "prompts")
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        require_kind(ckpt_path, ["grpo_pipeline"], "entreg-finetune ckpt_path")

    import lightning as L
    from hydra.utils import instantiate

    from entreg.modules.grpo_pipeline import GRPOPipelineModule

    L.seed_everything(cfg.seed, workers=True)
    reward = instantiate(cfg.reward, _convert_="all")
    options = {**instantiate(cfg.grpo, _convert_="all"), **OmegaConf.to_container(cfg.t2i, resolve=True)}
    # the grid is the pipeline's own (its scheduler's shift); evaluation: eval prompts x t2i.eval_per_prompt
    options = {k: v for k, v in options.items() if k not in ("shift", "eval_samples")}
    model = GRPOPipelineModule(pipeline, reward, prompts, prompt_column=cfg.prompt_column, seed=cfg.seed, **options)

    def exports(model: GRPOPipelineModule, output: Path) -> dict[str, str]:
        paths = {"lora": str(model.save_lora(output / "lora"))} if model.hparams.lora_rank is not None else {}
        if cfg.get("export_pipeline"):
            paths["pipeline"] = str(model.export_pipeline(output / "pipeline"))
        return paths

    title = f"entreg-finetune {cfg.grpo.variant} on {pipeline.name}: base -> fine-tuned"
    return fit_and_report(cfg, model, ckpt_path, title, exports)


# ---- multirun summary ------------------------------------------------------------------------------------------


def multirun_summary(sweep_dir: str | Path) -> tuple[list[str], dict[str, list[float | None]]]:
    """The numeric metrics every job of a multirun under ``sweep_dir`` wrote to ``<job>/metrics.json``: job labels
    (the overrides that differ between jobs, else the job directory's name) and, per metric, each job's value."""
    jobs = sorted(
        (path.parent for path in Path(sweep_dir).glob(f"*/{METRICS_FILE}")),
        key=lambda job: (not job.name.isdigit(), int(job.name) if job.name.isdigit() else 0, job.name),
    )
    overrides = []
    for job in jobs:
        file = job / ".hydra" / "overrides.yaml"
        overrides.append(list(OmegaConf.load(file)) if file.is_file() else [])
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    labels = [
        " ".join(o for o in job_overrides if o not in shared) or job.name
        for job, job_overrides in zip(jobs, overrides, strict=True)
    ]
    records = [json.loads((job / METRICS_FILE).read_text()) for job in jobs]
    names = list(dict.fromkeys(k for record in records for k, v in record.items() if _is_number(v)))
    return labels, {name: [float(r[name]) if _is_number(r.get(name)) else None for r in records] for name in names}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MultirunSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in ``configs/hydra/default.yaml``): at the end of a multirun, e.g.
    ``entreg-train -m seed=1,2,3``, print every metric across the jobs, mean ± std and each job's value, read from
    the ``metrics.json`` each job wrote."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        labels, metrics = multirun_summary(sweep_dir)
        if not metrics:
            say(f"multirun: no job wrote {METRICS_FILE} under {sweep_dir}")
            return
        rows = []
        for name, values in metrics.items():
            present = [v for v in values if v is not None]
            spread = f" ± {statistics.stdev(present):.4f}" if len(present) > 1 else ""
            rows.append([name, f"{statistics.fmean(present):.4f}{spread}", *values])
        title = f"multirun summary: {len(labels)} jobs"
        print_table(title, ["metric", "mean ± std", *labels], rows, {"multirun directory": str(sweep_dir)})


# ---- entry points ----------------------------------------------------------------------------------------------


def torchrun_overrides(env: dict[str, str] | None = None) -> list[str]:
    """Hydra overrides for a rank > 0 started by ``torchrun``, which runs the entry point once per rank.

    Each rank would otherwise resolve its own ``${now:...}`` run directory (ranks start a second
    apart). Only rank 0 keeps the run directory; the other ranks write no ``.hydra`` config and work
    in a scratch directory. Nothing else is lost: Lightning broadcasts rank 0's checkpoint and log
    directories, and only rank 0 writes logs and checkpoints.
    """
    env = os.environ if env is None else env
    rank = int(env.get("RANK", "0"))
    if "TORCHELASTIC_RUN_ID" not in env or rank == 0:
        return []
    scratch = tempfile.mkdtemp(prefix=f"entreg-rank{rank}-")
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", f"hydra.job.name=rank{rank}"]


USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)


def _user_error(error: BaseException) -> str | None:
    """The message of an error in what the user asked for (a value, a file, a config key), else None."""
    from hydra.errors import HydraException, InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, InstantiationException) and isinstance(error.__cause__, USER_ERRORS):
        return str(error)
    if isinstance(error, (*USER_ERRORS, HydraException, MisconfigurationException, OmegaConfBaseException)):
        return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return None


class _NoTips(logging.Filter):
    """Drops Lightning's promotional tips (``💡 Tip: ... try installing litlogger``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_dependencies() -> None:
    """Hide what entreg's commands should not print: Lightning's promotional tips and the deprecation
    warnings of dependencies that a user can do nothing about."""
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    for message in KNOWN_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


# deprecation warnings raised inside dependencies (not entreg's calls), matched by message
KNOWN_DEPRECATIONS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # lightning's _pytree on torch >= 2.10
)


def run_command(command: str, task: Any, cfg: DictConfig) -> Any:
    """Run ``task(cfg)`` as the command ``command``: a user error (bad value, missing file, unknown key) prints its
    message alone and exits with status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback); a fit stopped by a signal
    says where its checkpoint is and how to resume, and exits with 128 + the signal number; every exit other than
    success prints the run directory."""
    from entreg.callbacks import TrainingInterrupted

    quiet_dependencies()
    succeeded = False
    try:
        result = task(cfg)
        succeeded = True
        return result
    except TrainingInterrupted as stop:
        if stop.ckpt_path is not None:
            say(
                f"{command}: stopped by {stop.signal_name}; the exact state is in {stop.ckpt_path}",
                f"resume: {command} <the same overrides> ckpt_path=last (or ckpt_path={stop.ckpt_path})",
            )
        else:
            say(f"{command}: stopped by {stop.signal_name}; no checkpoint was written")
        raise
    except Exception as error:
        message = _user_error(error)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{command}: error: {message}", file=sys.stderr)
        print("(set HYDRA_FULL_ERROR=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if not succeeded and cfg.get("paths"):
            say(f"run directory: {cfg.paths.output_dir}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train_main(cfg: DictConfig) -> float | None:
    metrics = run_command("entreg-train", train, cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="adapt")
def adapt_main(cfg: DictConfig) -> None:
    """``entreg-adapt``: test-time adaptation of a checkpoint on a shifted stream."""
    run_command("entreg-adapt", adapt, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def sample_main(cfg: DictConfig) -> None:
    """``entreg-sample``: sample a diffusion checkpoint with a chosen scheduler and NFE."""
    run_command("entreg-sample", sample, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def finetune_main(cfg: DictConfig) -> None:
    """``entreg-finetune``: GRPO fine-tuning of a flow-matching checkpoint with a reward."""
    run_command("entreg-finetune", finetune, cfg)


def train_main() -> float | None:
    """``entreg-train``: returns ``cfg.optimized_metric`` when set (for Hydra sweepers).

    Multi-GPU: ``torchrun --standalone --nproc_per_node=N -m entreg.train trainer=ddp``.
    """
    sys.argv += torchrun_overrides()
    return _train_main()
