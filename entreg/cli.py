"""Hydra entry points. Configs live in the top-level ``configs/`` folder, installed as the
``entreg.configs`` package so that they are found from any install.

Heavy imports (lightning, torch models) happen inside the functions so that ``--help`` is fast.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import hydra
from omegaconf import DictConfig

CONFIG_PATH = "pkg://entreg.configs"
REPORTED_TEST_METRICS = {
    "test/acc": "accuracy",
    "test/nll": "NLL",
    "test/ece": "ECE",
    "test/entropy_mean": "mean entropy (nats)",
}


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group made of named ``_target_`` nodes (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(node, _convert_="all") for node in cfg.values() if node is not None and "_target_" in node]


def print_results(metrics: dict[str, float], title: str, extra: dict[str, str]) -> None:
    """Print the reported metrics as a table, then ``extra`` lines (paths) in full."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in REPORTED_TEST_METRICS.items():
        if key in metrics:
            table.add_row(label, f"{metrics[key]:.4f}")
    console = Console()
    console.print(table)
    for label, value in extra.items():
        console.print(f"{label}: {value}", soft_wrap=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data``, test the best checkpoint, print and return test metrics."""
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    if not cfg.get("test", True):
        return {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if trainer.is_global_zero:
        extra = {"checkpoint": best or "(none)"}
        if trainer.logger is not None and trainer.logger.log_dir:
            extra["logs"] = str(trainer.logger.log_dir)
        print_results(metrics, f"entreg {cfg.task_name}: test results", extra)
    return metrics


def adapt(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt_path`` and adapt it on ``cfg.stream`` with ``cfg.method``; print and return, per
    shift, the source accuracy, the online accuracy during adaptation and the adapted test accuracy."""
    import lightning as L
    from hydra.utils import get_class, instantiate

    L.seed_everything(cfg.seed, workers=True)
    model_class = get_class(cfg.model_class)
    datamodule = instantiate(cfg.stream, _convert_="all")

    def load() -> L.LightningModule:
        return model_class.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)

    def test(callbacks: list, loggers: list) -> list[dict[str, float]]:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
        return trainer.test(load(), datamodule=datamodule, verbose=False)

    source = test([], []) if cfg.compare_source else None
    tta = instantiate(cfg.method, _convert_="all")
    adapted = test([tta], instantiate_group(cfg.get("logger")))
    online = tta.online_error()
    rows, metrics = [], {}
    for idx, shift in enumerate(datamodule.shifts if not datamodule.mixed else ["mixed"]):
        key = f"test/acc/dataloader_idx_{idx}" if len(adapted) > 1 else "test/acc"
        row = {"source": source[idx].get(key) if source else None, "online": 1 - online.get(idx, float("nan"))}
        row["adapted"] = adapted[idx].get(key)
        rows.append((shift, row))
        metrics |= {f"{shift}/{name}": value for name, value in row.items() if value is not None}
    _print_adaptation(rows, f"entreg-adapt {cfg.method.method} on {cfg.ckpt_path}")
    return metrics


def _print_adaptation(rows: list[tuple[str, dict[str, float | None]]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("shift", "source acc", "online acc (pre-update)", "adapted acc"):
        table.add_column(column, justify="left" if column == "shift" else "right")
    for shift, row in rows:
        cells = [f"{row[k]:.4f}" if row[k] is not None else "-" for k in ("source", "online", "adapted")]
        table.add_row(shift, *cells)
    Console().print(table)


def sample(cfg: DictConfig) -> dict[str, float]:
    """Load the DiffusionModule checkpoint ``cfg.ckpt_path``, draw ``cfg.n`` samples with ``cfg.sampler`` in
    ``cfg.num_inference_steps`` steps, write ``samples.png`` and ``metrics.json`` to ``cfg.paths.output_dir``,
    print and return the metrics (against ``cfg.data``'s validation split when a data config is given)."""
    import json
    import time
    from pathlib import Path

    import lightning as L
    import torch
    from hydra.utils import instantiate

    from entreg.modules.diffusion import DiffusionModule

    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data, _convert_="all") if cfg.get("data") else None
    reference = instantiate(cfg.reference_mixture) if cfg.get("reference_mixture") else None
    if reference is None:
        reference = getattr(datamodule, "mixture", None)
    extractor = instantiate(cfg.feature_extractor) if cfg.get("feature_extractor") else None
    model = DiffusionModule.load_checkpoint(
        cfg.ckpt_path, map_location=cfg.device, feature_extractor=extractor, reference_mixture=reference
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
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _save_samples(model.to_image(samples) if samples.ndim == 4 else samples, output_dir / "samples.png", cfg.nrow)
    record = {"ckpt_path": str(cfg.ckpt_path), "sampler": cfg.sampler.scheduler, **metrics}
    (output_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    _print_sample_metrics(metrics, f"entreg-sample {cfg.sampler.scheduler} on {cfg.ckpt_path}", output_dir)
    return metrics


def _save_samples(samples: Any, path: Any, nrow: int) -> None:
    """An image grid of images in [0, 1], or a 256x256 histogram of the first two coordinates of vectors."""
    import torch
    from torchvision.utils import save_image

    if samples.ndim == 2:
        points = samples[torch.isfinite(samples).all(1)][:, :2].double()
        points = torch.cat([points, torch.zeros(len(points), 2 - points.shape[1], dtype=points.dtype)], 1)
        low, high = (points.amin(0), points.amax(0)) if len(points) else (torch.zeros(2), torch.ones(2))
        edges = [
            torch.linspace(float(a), float(b) + 1e-9, 257, dtype=torch.float64) for a, b in zip(low, high, strict=True)
        ]
        counts = torch.histogramdd(points, bins=edges).hist.T.flip(0)  # y up
        samples = (counts / counts.max().clamp(min=1)).sqrt()[None, None].float()
    save_image(samples, path, nrow=nrow)


def _print_sample_metrics(metrics: dict[str, float], title: str, output_dir: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"samples: {output_dir / 'samples.png'}", soft_wrap=True)
    console.print(f"metrics: {output_dir / 'metrics.json'}", soft_wrap=True)


def finetune(cfg: DictConfig) -> dict[str, float]:
    """GRPO fine-tuning of the FlowMatchingModule checkpoint ``cfg.base_checkpoint`` with ``cfg.reward`` and the
    ``cfg.grpo`` variant; prints and returns the final evaluation (reward, path-KL, ``cfg.eval_metrics``)."""
    import lightning as L
    from hydra.utils import instantiate

    from entreg.modules.grpo import GRPOModule

    L.seed_everything(cfg.seed, workers=True)
    reward = instantiate(cfg.reward, _convert_="all")
    eval_metrics = instantiate(cfg.eval_metrics, _convert_="all") if cfg.get("eval_metrics") else None
    options = instantiate(cfg.grpo, _convert_="all")
    model = GRPOModule.from_flow_checkpoint(
        cfg.base_checkpoint, reward, eval_metrics=eval_metrics, seed=cfg.seed, **options
    )
    before = model.evaluate()
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    trainer.fit(model, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    after = model.to(trainer.strategy.root_device).evaluate()
    if trainer.is_global_zero:
        _print_finetune(before, after, model.cost, f"entreg-finetune {cfg.grpo.variant}: base -> fine-tuned")
    return {f"eval/{k}": v for k, v in after.items()}


def _print_finetune(before: dict[str, float], after: dict[str, float], cost: dict[str, int], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "base", "fine-tuned"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, value in after.items():
        table.add_row(name, f"{before.get(name, float('nan')):.4f}", f"{value:.4f}")
    for name, value in cost.items():
        table.add_row(name, "", str(value))
    Console().print(table)


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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="adapt")
def adapt_main(cfg: DictConfig) -> None:
    """``entreg-adapt``: test-time adaptation of a checkpoint on a shifted stream."""
    adapt(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def sample_main(cfg: DictConfig) -> None:
    """``entreg-sample``: sample a diffusion checkpoint with a chosen scheduler and NFE."""
    sample(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="finetune")
def finetune_main(cfg: DictConfig) -> None:
    """``entreg-finetune``: GRPO fine-tuning of a flow-matching checkpoint with a reward."""
    finetune(cfg)


def train_main() -> float | None:
    """``entreg-train``: returns ``cfg.optimized_metric`` when set (for Hydra sweepers).

    Multi-GPU: ``torchrun --standalone --nproc_per_node=N -m entreg.train trainer=ddp``.
    """
    sys.argv += torchrun_overrides()
    return _train_main()
