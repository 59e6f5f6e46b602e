"""configs/stream/: every benchmark stream config composes inside entreg-adapt's config and instantiates (Hydra) on
a small fixture in its published layout; roots default to $ENTREG_DATA_DIR/<the folder the release unpacks to>."""

from __future__ import annotations

from pathlib import Path

import entreg.configs
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torchvision import transforms as T

from entreg.data import COMMON_CORRUPTIONS, BenchmarkStream
from tests.stream_fixtures import stream_config_overrides, write_cifar_c

STREAM_DIR = Path(entreg.configs.__file__).parent / "stream"
BENCHMARKS = {  # config -> (class, default folder under $ENTREG_DATA_DIR, domains, classes, class subset?)
    "cifar10_c": ("CIFAR10CDataModule", "CIFAR-10-C", 15, 10, False),
    "cifar100_c": ("CIFAR100CDataModule", "CIFAR-100-C", 15, 100, False),
    "imagenet_c": ("ImageNetCDataModule", "ImageNet-C", 15, 1000, False),
    "imagenet_r": ("ImageNetRDataModule", "imagenet-r", 1, 200, True),
    "imagenet_a": ("ImageNetADataModule", "imagenet-a", 1, 200, True),
    "image_folder": ("ImageFolderStream", "images", 1, 2, False),
    "image_folder_c": ("ImageFolderCDataModule", "images", 5, 2, False),  # the 5 torch shifts in the test
}


def compose_stream(*overrides: str):
    with initialize_config_module("entreg.configs", version_base="1.3"):
        return compose("adapt", overrides=list(overrides))


def test_every_benchmark_stream_config_is_listed_here():
    digits = {p.stem for p in STREAM_DIR.glob("digits*.yaml")}
    assert {p.stem for p in STREAM_DIR.glob("*.yaml")} - digits == set(BENCHMARKS)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_stream_config_instantiates_on_its_fixture(name, tmp_path):
    target, _, count, num_classes, subset = BENCHMARKS[name]
    cfg = compose_stream(f"stream={name}", *stream_config_overrides(name, tmp_path))
    assert cfg.stream._target_ == f"entreg.data.{target}"
    dm = instantiate(cfg.stream, _convert_="all")
    assert isinstance(dm, BenchmarkStream) and dm.num_classes == num_classes and (dm.class_subset is not None) == subset
    assert cfg.stream.get("num_classes", num_classes) == num_classes  # what model configs may interpolate
    if name in ("imagenet_r", "imagenet_a", "image_folder"):  # images of any size: the model's transform resizes them
        dm.set_transform(T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()]))
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.domains) == count and len(dm.test_dataloader()) == count
    if name in ("cifar10_c", "cifar100_c", "imagenet_c"):
        assert [d.corruption for d in dm.domains] == list(COMMON_CORRUPTIONS) and {d.severity for d in dm.domains} == {
            5
        }
    images, labels = next(iter(dm.test_dataloader()[0]))
    assert images.ndim == 4 and images.shape[1] == 3 and 0 <= images.min() and images.max() <= 1
    assert len(labels) == len(images) and int(labels.max()) < num_classes
    options = dm.loader_options()
    assert options["batch_size"] == cfg.stream.batch_size and options["num_workers"] == 0


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_stream_config_defaults_and_documentation(name, monkeypatch, tmp_path):
    _, folder, _, _, _ = BENCHMARKS[name]
    monkeypatch.setenv("ENTREG_DATA_DIR", str(tmp_path))
    cfg = compose_stream(f"stream={name}")
    assert cfg.stream.root == f"{tmp_path}/{folder}"  # resolved from $ENTREG_DATA_DIR
    assert cfg.stream.num_workers > 0 and cfg.stream.pin_memory is None and cfg.stream.shuffle is True
    text = (STREAM_DIR / f"{name}.yaml").read_text()
    assert "#   entreg-adapt " in text and f"stream={name} " in text  # an example command
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "#", "_target_"))]
    assert set(keys) == set(cfg.stream) - {"_target_"}
    if name not in ("image_folder", "image_folder_c"):
        assert "https://" in text  # where users get the files
    if name in ("cifar10_c", "cifar100_c", "imagenet_c"):
        assert list(cfg.stream.corruptions) == list(COMMON_CORRUPTIONS) and list(cfg.stream.severities) == [5]


def test_root_comes_from_entreg_data_dir(tmp_path, monkeypatch):
    write_cifar_c(tmp_path / "CIFAR-10-C", COMMON_CORRUPTIONS, n=2)
    monkeypatch.setenv("ENTREG_DATA_DIR", str(tmp_path))
    dm = instantiate(compose_stream("stream=cifar10_c").stream, _convert_="all")
    assert dm.root == tmp_path / "CIFAR-10-C"
    monkeypatch.setenv("ENTREG_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(InstantiationException, match=r"FileNotFoundError.*elsewhere/CIFAR-10-C' is not a directory"):
        instantiate(compose_stream("stream=cifar10_c").stream, _convert_="all")


def test_image_folder_c_default_backend_generates_imagecorruptions_sets(tmp_path):
    pytest.importorskip("imagecorruptions")
    overrides = stream_config_overrides("image_folder_c", tmp_path)
    overrides = [o for o in overrides if not o.startswith("stream.backend=")]  # the config's imagecorruptions
    cfg = compose_stream("stream=image_folder_c", *overrides, "stream.corruptions=[gaussian_noise,contrast]")
    dm = instantiate(cfg.stream, _convert_="all")
    dm.prepare_data()
    dm.setup()
    assert [d.name for d in dm.domains] == ["gaussian_noise_5", "contrast_5"]
    assert len(list((tmp_path / "cache").glob("imagecorruptions-*.npy"))) == 2
