"""timm and torchvision models from local weight files: every supported format round-trips with identical logits,
the preprocessing equals the library's own, and bad files fail naming the file, the format and the keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from entreg.nn.pretrained import DataConfig, WeightsError, timm_model, torchvision_model


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, so that eval logits depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
    return net.eval()


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def resnet10t() -> torch.nn.Module:
    return randomized(timm.create_model("resnet10t", pretrained=False), seed=0)


IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_weights_round_trip_in_each_format(resnet10t, suffix, tmp_path):
    path = save(resnet10t.state_dict(), tmp_path / f"resnet10t{suffix}")
    net, data = timm_model("resnet10t", path)
    assert net.pretrained_cfg["file"] == str(path) and not net.training
    with torch.no_grad():
        assert torch.equal(net(IMAGES), resnet10t(IMAGES))
    # resnet10t.c3_in1k's config: 176 px, crop_pct 0.875 -> resize floor(176 / 0.875) = 201, bicubic, ImageNet stats
    assert data == DataConfig((3, 176, 176), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 201, "bicubic")


def test_timm_training_checkpoint_dict_with_module_prefix(resnet10t, tmp_path):
    state = {"state_dict": {f"module.{k}": v for k, v in resnet10t.state_dict().items()}, "epoch": 3}
    net, _ = timm_model("resnet10t.c3_in1k", save(state, tmp_path / "checkpoint.pth"))
    with torch.no_grad():
        assert torch.equal(net(IMAGES), resnet10t(IMAGES))


def test_timm_head_of_another_width_is_loaded_not_left_random(tmp_path):
    """timm drops a file's classifier when num_classes differs from the pretrained config's and keeps a random
    one; num_classes also goes into the overlay, so the file's 10-class head is the one used."""
    source = randomized(timm.create_model("resnet10t", pretrained=False, num_classes=10), seed=4)
    net, _ = timm_model("resnet10t", save(source.state_dict(), tmp_path / "w.safetensors"), num_classes=10)
    assert torch.equal(net.fc.weight, source.fc.weight) and torch.equal(net.fc.bias, source.fc.bias)
    with torch.no_grad():
        assert torch.equal(net(IMAGES), source(IMAGES))


def test_timm_vit_round_trips_through_its_checkpoint_filter(tmp_path):
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}
    source = randomized(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), seed=2)
    net, data = timm_model("vit_tiny_patch16_224", save(source.state_dict(), tmp_path / "vit.safetensors"), **kwargs)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), source(x))
    assert data.mean == (0.5, 0.5, 0.5) and data.interpolation == "bicubic"


def pil_image(height: int = 240, width: int = 320) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def normalised(data: DataConfig, image: Image.Image) -> torch.Tensor:
    x = data.image_transform()(image)
    return (x - torch.tensor(data.mean).view(3, 1, 1)) / torch.tensor(data.std).view(3, 1, 1)


@pytest.mark.parametrize("name", ["resnet10t", "resnet50.tv_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k"])
def test_timm_preprocessing_equals_timms_transform(name):
    """image_transform + the model's normalisation == timm.data.create_transform(**resolve_model_data_config)."""
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_model_data_config(net)
    data = DataConfig.from_timm(config)
    image = pil_image()
    torch.testing.assert_close(normalised(data, image), timm.data.create_transform(**config)(image), atol=1e-6, rtol=0)


def test_squash_crop_mode_resizes_both_sides():
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    config |= {"crop_pct": 0.8, "crop_mode": "squash"}
    data = DataConfig.from_timm(config)
    assert data.resize_size == (40, 40)
    image = pil_image(50, 90)
    torch.testing.assert_close(normalised(data, image), timm.data.create_transform(**config)(image), atol=1e-6, rtol=0)


def test_image_transform_takes_arrays_and_tensors_and_can_skip_the_resize():
    data = DataConfig((3, 224, 224), resize_size=256)
    image = pil_image()
    from_array = data.image_transform()(np.array(image))  # e.g. CIFAR-C rows: resized by PIL as the image is
    assert from_array.shape == (3, 224, 224) and from_array.dtype == torch.float32
    assert torch.equal(from_array, data.image_transform()(image))
    crop = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)  # e.g. an ImageNet-C file, already cropped
    torch.testing.assert_close(data.image_transform(resize=False)(crop), crop.float() / 255)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    source = randomized(torchvision.models.resnet18(), seed=3)
    return source, save(source.state_dict(), tmp_path_factory.mktemp("tv") / "resnet18-f37072fd.pth")


def test_torchvision_resnet18_from_a_local_file(resnet18_file):
    source, path = resnet18_file
    net, data = torchvision_model("resnet18", path)
    assert net.num_classes == 1000 and not net.training
    with torch.no_grad():
        assert torch.equal(net(IMAGES), source(IMAGES))
    assert data == DataConfig((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 256, "bilinear")
    # the preprocessing of the weights entry, as torchvision's own preset computes it
    preset = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    image = pil_image()
    torch.testing.assert_close(normalised(data, image), preset(image), atol=1e-6, rtol=0)


def test_torchvision_weights_entry_sets_the_preprocessing(tmp_path):
    source = randomized(torchvision.models.mobilenet_v2(), seed=0)
    path = save({"model": source.state_dict()}, tmp_path / "mobilenet_v2.pth")  # a training checkpoint dict
    net, data = torchvision_model("mobilenet_v2", path, weights="IMAGENET1K_V2")
    assert data.resize_size == 232 and data.input_size == (3, 224, 224)
    _, default = torchvision_model("mobilenet_v2", path)  # IMAGENET1K_V1, the TTA papers' entries
    assert default.resize_size == 256
    with torch.no_grad():
        assert torch.equal(net(IMAGES), source(IMAGES))


def test_missing_files_name_the_file_and_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"timm model 'resnet10t': weights file '.*nope\.safetensors' does"):
        timm_model("resnet10t", tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"expected a torchvision state_dict") as error:
        torchvision_model("resnet18", tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(error.value)


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("w.npz", b"PK", r"suffix '\.npz' \(a JAX \.npz.*expected a timm state_dict as \.safetensors, \.pth or \.bin"),
        ("w.pth", b"<html><body>Too many users have viewed or downloaded this file", r"'.*w\.pth' is an HTML/XML page"),
        ("w.safetensors", b"\xff" * 64, r"cannot read '.*w\.safetensors' \(SafetensorError"),
        ("w.bin", b"PK\x03\x04 not a zip", r"cannot read '.*w\.bin' \(RuntimeError"),
    ],
    ids=["npz", "html", "bad_safetensors", "truncated"],
)
def test_timm_files_in_a_wrong_format_are_named(tmp_path, filename, content, match):
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        timm_model("resnet10t", tmp_path / filename)


def test_timm_mismatched_keys_are_listed(resnet18_file, tmp_path):
    path = save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.safetensors")
    with pytest.raises(WeightsError) as error:
        timm_model("resnet10t", path)
    message = str(error.value)
    assert str(path) in message and "expected a timm state_dict" in message
    assert "missing keys: conv1.0.weight, conv1.1.weight" in message  # resnet10t's deep stem
    assert "unexpected keys: conv1.weight, layer1.1." in message  # batch counts come last
    assert "shape mismatches: layer2.0.downsample.1.weight (128,) in the file, (128, 64, 1, 1) in the model" in message


def test_timm_head_width_mismatch_is_listed(tmp_path):
    ten = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    path = save(ten.state_dict(), tmp_path / "ten.pth")
    with pytest.raises(WeightsError, match=r"fc\.weight.*\[10, 512\].*\[1000, 512\]|fc\.weight \(10, 512\)"):
        timm_model("resnet10t", path)


def test_torchvision_mismatched_keys_and_shapes_are_listed(resnet18_file, tmp_path):
    _, path = resnet18_file
    with pytest.raises(WeightsError) as error:
        torchvision_model("resnet34", path)
    assert str(path) in str(error.value) and "missing keys: layer1.2.conv1.weight" in str(error.value)
    with pytest.raises(WeightsError, match=r"shape mismatches: fc\.weight \(1000, 512\) in the file, \(10, 512\)"):
        torchvision_model("resnet18", path, num_classes=10)


def test_unknown_names_and_weights_entries():
    with pytest.raises(ValueError, match="close names: resnet50"):
        timm_model("resnet_50", "x.pth")
    with pytest.raises(ValueError, match=r"no pretrained tag 'nope' for resnet10t; valid: \['resnet10t.c3_in1k'\]"):
        timm_model("resnet10t.nope", "x.pth")
    with pytest.raises(ValueError, match="close names: resnet50"):
        torchvision_model("resnet5O", "x.pth")
    with pytest.raises(ValueError, match=r"valid: \['IMAGENET1K_V1', 'DEFAULT'\]"):
        torchvision_model("resnet18", "x.pth", weights="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        timm_model("resnet10t", "x.pth", num_classes=1)


def test_data_config_checks_its_fields():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        DataConfig((3, 8, 8), interpolation="cubic")
    with pytest.raises(ValueError, match="one value per channel"):
        DataConfig((3, 8, 8), mean=(0.5,), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="unknown DataConfig fields"):
        DataConfig.coerce({"input_size": (3, 8, 8), "crop": 0.9})
    assert DataConfig.coerce({"input_size": [3, 8, 8], "resize_size": 10}).crop_pct == 0.8
