"""RobustBench's corruption models: keys and shapes equal RobustBench's lists; checkpoints in each of its layouts
round-trip with identical logits; bad files fail naming the file, the format and the keys."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from entreg.nn.pretrained import WeightsError
from entreg.nn.robustbench import (
    ROBUSTBENCH_MODELS,
    AugMixResNeXt,
    AugMixWideResNet,
    CifarResNeXt,
    WideResNet,
    load_robustbench,
    robustbench_architecture,
    robustbench_model,
)

KEYS = Path(__file__).parent / "data" / "robustbench_keys"
LISTS = {  # (dataset, name) -> RobustBench's key list, and its parameter count (research notes, from RB's code)
    ("cifar10", "Standard"): ("keys_Standard_c10.txt", 36_479_194),
    ("cifar10", "Hendrycks2020AugMix_WRN"): ("keys_AugMixWRN_c10.txt", 2_243_546),
    ("cifar100", "Hendrycks2020AugMix_WRN"): ("keys_AugMixWRN_c100.txt", 2_255_156),
    ("cifar10", "Hendrycks2020AugMix_ResNeXt"): ("keys_AugMixResNeXt_c10.txt", 6_807_882),
    ("cifar100", "Hendrycks2020AugMix_ResNeXt"): ("keys_AugMixResNeXt_c100.txt", 6_900_132),
}


def test_the_registry_holds_the_five_corruption_models():
    assert set(ROBUSTBENCH_MODELS) == set(LISTS)
    assert ROBUSTBENCH_MODELS[("cifar10", "Standard")].file == "cifar10/corruptions/Standard.pt"


@pytest.mark.parametrize("key", list(LISTS), ids=lambda k: f"{k[1]}-{k[0]}")
def test_state_dict_keys_order_and_shapes_equal_robustbench(key):
    dataset, name = key
    file, params = LISTS[key]
    with torch.device("meta"):  # real sizes, nothing allocated
        net = robustbench_architecture(name, dataset)
    ours = [f"{k}\t{tuple(v.shape)}" for k, v in net.state_dict().items()]
    assert ours == (KEYS / file).read_text().splitlines()
    assert sum(p.numel() for p in net.parameters()) == params


def randomized(net: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BatchNorm statistics (eval logits depend on every tensor), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif tensor.is_floating_point() and name not in ("mu", "sigma"):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    return net.eval()


TINY = {  # code paths of each architecture at the smallest depth
    "wrn": lambda: WideResNet(depth=10, widen_factor=2),
    "augmix_wrn": lambda: AugMixWideResNet(depth=10, widen_factor=1, num_classes=100),
    "augmix_resnext": lambda: AugMixResNeXt(depth=11, cardinality=2, base_width=4),
}
REGISTRY_NAME = {  # which registry entry's rules (optional keys, messages) each tiny model is loaded under
    "wrn": ("Standard", "cifar10"),
    "augmix_wrn": ("Hendrycks2020AugMix_WRN", "cifar100"),
    "augmix_resnext": ("Hendrycks2020AugMix_ResNeXt", "cifar10"),
}


def layout(state: dict[str, torch.Tensor], kind: str) -> object:
    """RobustBench's checkpoint dict layouts."""
    if kind == "bare":
        return state
    if kind == "state_dict":
        return {"state_dict": state, "epoch": 200, "best_acc": 94.78}
    if kind == "state_dict_module":  # saved from DataParallel
        return {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    if kind == "bare_model":  # saved from a wrapper with .model
        return {f"model.{k}": v for k, v in state.items()}
    if kind == "module_model":  # DataParallel around a wrapper
        return {"state_dict": {f"module.model.{k}": v for k, v in state.items()}}
    if kind == "model_state_dict":
        return {"model_state_dict": state, "optimizer_state_dict": {}}
    if kind == "without_mu_sigma":  # the AugMix files: RobustBench's load_model tolerates exactly these missing
        return {k: v for k, v in state.items() if k not in ("mu", "sigma")}
    raise AssertionError(kind)


LAYOUTS = ["bare", "state_dict", "state_dict_module", "bare_model", "module_model", "model_state_dict"]


CASES = [(a, k) for a in TINY for k in [*LAYOUTS, "legacy_serialization"]]
CASES += [(a, "without_mu_sigma") for a in TINY if a.startswith("augmix")]  # only they have mu/sigma


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_checkpoint_layout_round_trips_with_identical_logits(arch, kind, tmp_path):
    source = randomized(TINY[arch](), seed=1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "model.pt"
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if kind == "legacy_serialization":  # torch.save before torch 1.6 (RobustBench's older files)
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(layout(state, kind), path)
    fresh = randomized(TINY[arch](), seed=3)
    with torch.no_grad():
        want, before = source(x), fresh(x)
        assert not torch.allclose(want, before)  # the load must change something
        name, dataset = REGISTRY_NAME[arch]
        loaded = load_robustbench(name, dataset, path, model=fresh)
        assert loaded is fresh and not loaded.training
        got = loaded(x)
    assert torch.equal(got, want), (got - want).abs().max()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_registry_model_round_trips_through_robustbench_model(tmp_path):
    """The real WideResNet-40-2 of the registry, saved as RobustBench's AugMix files are (state_dict with module.
    prefixes, no mu/sigma), comes back with identical logits and its 32x32 [0, 1] preprocessing."""
    source = randomized(robustbench_architecture("Hendrycks2020AugMix_WRN", "cifar10"), seed=5)
    path = tmp_path / "cifar10" / "corruptions" / "Hendrycks2020AugMix_WRN.pt"
    path.parent.mkdir(parents=True)
    torch.save(layout(layout(source.state_dict(), "without_mu_sigma"), "state_dict_module"), path)
    net, data = robustbench_model("Hendrycks2020AugMix_WRN", "cifar10", path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), source(x))
    assert torch.equal(net.mu, torch.full((1, 3, 1, 1), 0.5)) and torch.equal(net.sigma, net.mu)
    assert data.input_size == (3, 32, 32) and data.resize_size is None
    assert data.mean == (0.0, 0.0, 0.0) and data.std == (1.0, 1.0, 1.0)


def test_augmix_models_normalise_inside_and_standard_does_not():
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    wrn = AugMixWideResNet(depth=10, widen_factor=1).eval()
    plain = WideResNet(depth=10, widen_factor=1).eval()
    plain.load_state_dict({k: v for k, v in wrn.state_dict().items() if k not in ("mu", "sigma")})
    resnext = AugMixResNeXt(depth=11, cardinality=2, base_width=4).eval()
    plain_resnext = CifarResNeXt(depth=11, cardinality=2, base_width=4).eval()
    plain_resnext.load_state_dict({k: v for k, v in resnext.state_dict().items() if k not in ("mu", "sigma")})
    with torch.no_grad():
        torch.testing.assert_close(wrn(x), plain(2 * x - 1))
        torch.testing.assert_close(resnext(x), plain_resnext(2 * x - 1))


def save_tiny(path: Path, **kwargs) -> WideResNet:
    net = WideResNet(depth=10, widen_factor=1, **kwargs)
    torch.save({"state_dict": net.state_dict()}, path)
    return net


def test_missing_file_names_it_and_robustbench_layout(tmp_path):
    path = tmp_path / "Standard.pt"
    with pytest.raises(FileNotFoundError) as error:
        load_robustbench("Standard", "cifar10", path)
    assert str(path) in str(error.value) and "cifar10/corruptions/Standard.pt" in str(error.value)


def test_mismatched_keys_are_listed_with_file_and_format(tmp_path):
    path = tmp_path / "wrn.pt"
    save_tiny(path)
    with pytest.raises(WeightsError) as error:
        load_robustbench("Hendrycks2020AugMix_WRN", "cifar10", path)  # the real WRN-40-2
    message = str(error.value)
    assert str(path) in message and "cifar10/corruptions/Hendrycks2020AugMix_WRN.pt" in message
    # WRN-10-1 keeps 16 channels in group 1 (no shortcut conv there) and has one block per group, WRN-40-2 six
    assert "missing keys: block1.layer.0.convShortcut.weight, block1.layer.1.bn1.weight, " in message
    assert "(151 in all)" in message  # lists are cut after 10 keys, with the count
    assert "shape mismatches: block1.layer.0.conv1.weight (16, 16, 3, 3) in the file, (32, 16, 3, 3) in the model" in (
        message
    )


def test_only_mu_and_sigma_may_be_missing(tmp_path):
    net = WideResNet(depth=10, widen_factor=1)
    state = {k: v for k, v in net.state_dict().items() if k != "fc.bias"}
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"missing keys: fc\.bias; unexpected keys: extra\.weight"):
        load_robustbench("Standard", "cifar10", tmp_path / "w.pt", model=WideResNet(depth=10, widen_factor=1))


def test_num_batches_tracked_may_be_missing_as_in_old_checkpoints(tmp_path):
    source = randomized(WideResNet(depth=10, widen_factor=1), seed=1)
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches" not in k}, tmp_path / "old.pt")
    loaded = load_robustbench("Standard", "cifar10", tmp_path / "old.pt", model=WideResNet(depth=10, widen_factor=1))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>", "HTML/XML page"),
        (b"PK\x03\x04 truncated", "cannot read"),
    ],
    ids=["html_from_gdrive", "truncated"],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content, match):
    path = tmp_path / "Standard.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as error:
        load_robustbench("Standard", "cifar10", path)
    assert str(path) in str(error.value) and "'state_dict'" in str(error.value)


def test_truncated_real_checkpoint_is_named(tmp_path):
    path = tmp_path / "w.pt"
    save_tiny(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(WeightsError, match="cannot read") as error:
        load_robustbench("Standard", "cifar10", path, model=WideResNet(depth=10, widen_factor=1))
    assert str(path) in str(error.value)


def test_pickled_objects_need_weights_only_false(tmp_path):
    """Training scripts often save their argparse namespace beside the weights: refused by default (it could run
    code), loaded with weights_only=False."""
    source = randomized(WideResNet(depth=10, widen_factor=1), seed=1)
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="weights_only=False"):
        load_robustbench("Standard", "cifar10", tmp_path / "w.pt", model=WideResNet(depth=10, widen_factor=1))
    net = load_robustbench(
        "Standard", "cifar10", tmp_path / "w.pt", model=WideResNet(depth=10, widen_factor=1), weights_only=False
    )
    assert torch.equal(net.fc.weight, source.fc.weight)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['Hendrycks2020AugMix_ResNeXt', 'Hendrycks2020AugMix_WRN'\]"):
        robustbench_architecture("Standard", "cifar100")
    with pytest.raises(ValueError, match=r"must be one of \['cifar10', 'cifar100'\]"):
        robustbench_architecture("Standard", "imagenet")
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=26)
    with pytest.raises(ValueError, match="9n \\+ 2"):
        CifarResNeXt(depth=30)
