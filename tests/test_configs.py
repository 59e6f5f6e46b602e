"""Every config file composes and instantiates; every experiment runs; the default fit learns."""

from __future__ import annotations

from pathlib import Path

import entreg.configs
import pytest
import torch
from hydra.utils import instantiate

from entreg.cli import instantiate_group, train

from .test_data import write_fake_cifar10, write_image_folder

CONFIG_DIR = Path(entreg.configs.__file__).parent
GROUPS = ("data", "model", "backbone", "callbacks", "logger", "trainer")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_config_file_is_covered_here():
    covered = {f"{group}/{name}" for group in (*GROUPS, "experiment") for name in options(group)}
    covered |= {"train", "paths/default", "hydra/default"}  # composed by every test below and by the CLI tests
    files = {str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")}
    assert files == covered


@pytest.fixture
def data_on_disk(tmp_path, monkeypatch):
    """Overrides that point the on-disk data configs at tiny real-layout copies."""
    from torchvision.datasets import CIFAR10

    write_fake_cifar10(tmp_path / "cifar10")
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    write_image_folder(tmp_path / "images")
    return {
        "cifar10": [f"data.data_dir={tmp_path / 'cifar10'}", "data.val_size=10", "data.num_workers=0"],
        "image_folder": [f"data.data_dir={tmp_path / 'images'}", "data.num_classes=3", "data.num_workers=0"],
    }


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_config_composes_and_instantiates(group, option, compose_train, data_on_disk):
    overrides = [f"{group}={option}"]
    if group == "data":
        overrides += data_on_disk.get(option, [])
    if group == "trainer" and "gpu" in option and not torch.cuda.is_available():
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    cfg = compose_train(*overrides, fast=group not in ("callbacks", "logger"))
    if group == "data":
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup("fit")
        x, y = next(iter(datamodule.train_dataloader()))
        assert x.shape[1] == cfg.data.channels and int(y.max()) < cfg.data.num_classes
    elif group in ("model", "backbone"):
        model = instantiate(cfg.model, _convert_="all")
        size = 32
        logits = model.eval()(torch.randn(2, cfg.data.channels, size, size))
        assert logits.shape == (2, cfg.data.num_classes)
    elif group == "callbacks":
        assert len(instantiate_group(cfg.callbacks)) == len([k for k, v in (cfg.callbacks or {}).items() if v])
    elif group == "logger":
        assert len(instantiate_group(cfg.logger)) == len(cfg.logger or {})
    else:
        trainer = instantiate(cfg.trainer, _convert_="all")
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs(experiment, compose_train, data_on_disk):
    cfg = compose_train(
        f"experiment={experiment}",
        "trainer.fast_dev_run=true",
        *data_on_disk.get("cifar10" if experiment.startswith("cifar10") else "", []),
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/nll"] > 0


def test_default_experiment_reaches_90_percent(compose_train, tmp_path):
    cfg = compose_train("callbacks.progress_bar=null", "trainer.enable_progress_bar=false", fast=False)
    assert cfg.model.output_activation == "era" and cfg.model.backbone == "small_cnn"
    metrics = train(cfg)
    assert metrics["test/acc"] >= 0.90
    assert metrics["test/entropy_min"] >= cfg.model.output_activation_kwargs.target_entropy  # the ERA floor
    assert list((tmp_path / "checkpoints").glob("*.ckpt")), "no checkpoint written"
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"
