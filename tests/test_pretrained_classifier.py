"""PretrainedClassifier: normalisation and class subset inside `net`, the builders, per-dataloader test metrics,
and entreg's TestTimeAdaptation callback on it (Tent adapts only norm affine parameters, also under DDP)."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.modules import ClassificationModule, PretrainedClassifier
from entreg.nn.pretrained import DataConfig, NormalizedClassifier
from entreg.nn.robustbench import WideResNet, robustbench_architecture
from tests.helpers import make_trainer

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def tiny_wrn(seed: int = 0, num_classes: int = 10) -> WideResNet:
    torch.manual_seed(seed)
    net = WideResNet(depth=10, widen_factor=1, num_classes=num_classes)
    with torch.no_grad():
        net.fc.weight.mul_(20.0)  # confident enough that entropy has a gradient worth following
    return net.eval()


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_forward_normalises_inside_net_and_keeps_the_class_subset():
    net = tiny_wrn()
    model = PretrainedClassifier(net, DataConfig((3, 32, 32), MEAN, STD), class_subset=[7, 2, 5]).eval()
    assert isinstance(model.net, NormalizedClassifier) and model.net.model is net
    x = images(4)
    want = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))[:, [7, 2, 5]]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.net(x), model(x), rtol=0, atol=0)
    assert model.hparams.num_classes == 3 and model.hparams.source_classes == 10
    assert model.hparams.data_config["mean"] == list(MEAN)
    with pytest.raises(ValueError, match=r"class_subset indices must be in \[0, 10\), got \[10\]"):
        PretrainedClassifier(net, class_subset=[1, 10])


def test_num_classes_comes_from_the_network_or_one_forward_pass():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    assert PretrainedClassifier(plain, {"input_size": (3, 8, 8)}).hparams.num_classes == 6
    with pytest.raises(ValueError, match="pass num_classes"):
        PretrainedClassifier(plain)


def test_image_transform_follows_the_data_config():
    model = PretrainedClassifier(tiny_wrn(), DataConfig((3, 32, 32), resize_size=36))
    x = model.image_transform()(torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert model.image_transform(resize=False)(torch.zeros(3, 50, 40, dtype=torch.uint8)).shape == (3, 50, 40)


def test_builders_from_files(tmp_path):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    torch.save(resnet.state_dict(), tmp_path / "r.pth")
    model = PretrainedClassifier.timm("resnet10t", tmp_path / "r.pth", num_classes=5, class_subset=[4, 0]).eval()
    x = images(2)
    mean, std = torch.tensor(model.data_config.mean).view(1, 3, 1, 1), torch.tensor(model.data_config.std)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet((x - mean) / std.view(1, 3, 1, 1))[:, [4, 0]], rtol=0, atol=1e-6)
    assert model.hparams.source == {"kind": "timm", "name": "resnet10t", "file": str(tmp_path / "r.pth")}

    wrn = robustbench_architecture("Hendrycks2020AugMix_WRN", "cifar100").eval()
    torch.save({"state_dict": wrn.state_dict()}, tmp_path / "Hendrycks2020AugMix_WRN.pt")
    model = PretrainedClassifier.robustbench(
        "Hendrycks2020AugMix_WRN", "cifar100", tmp_path / "Hendrycks2020AugMix_WRN.pt"
    )
    assert model.hparams.num_classes == 100 and model.data_config.input_size == (3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), wrn(x))  # mean 0, std 1 outside: the model's own mu/sigma only


def test_from_entreg_checkpoint_predicts_as_the_trained_classifier(tmp_path):
    torch.manual_seed(0)
    trained = ClassificationModule("small_cnn", 4, 3, backbone_kwargs={"widths": (4, 8)}, output_activation="era",
                                   output_activation_kwargs={"target_entropy": 0.5})  # fmt: skip
    data = TensorDataset(images(8), torch.randint(0, 4, (8,)))
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(trained, DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    model = PretrainedClassifier.from_entreg_checkpoint(tmp_path / "c.ckpt").eval()
    x = images(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained.eval()(x), rtol=0, atol=0)
    assert model.hparams.num_classes == 4 and model.hparams.source["backbone"] == "small_cnn"
    with pytest.raises(FileNotFoundError, match=r"an entreg-train \.ckpt"):
        PretrainedClassifier.from_entreg_checkpoint(tmp_path / "missing.ckpt")


def labelled(net: nn.Module, n: int, seed: int, flip: int) -> TensorDataset:
    """Images labelled with the net's own prediction, except the first ``flip`` (known accuracy)."""
    x = images(n, seed)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:flip] = (y[:flip] + 1) % 10
    return TensorDataset(x, y)


def test_test_step_logs_accuracy_and_error_per_dataloader():
    net = tiny_wrn()
    model = PretrainedClassifier(net, DataConfig((3, 32, 32)))
    loaders = [DataLoader(labelled(net, 8, seed, flip), batch_size=4) for seed, flip in ((1, 2), (2, 6))]
    trainer = make_trainer(None)
    trainer.test(model, loaders, verbose=False)
    metrics = trainer.callback_metrics
    assert float(metrics["test/acc/dataloader_idx_0"]) == pytest.approx(6 / 8)
    assert float(metrics["test/acc/dataloader_idx_1"]) == pytest.approx(2 / 8)
    assert float(metrics["test/error/dataloader_idx_1"]) == pytest.approx(6 / 8)
    assert {"test/nll/dataloader_idx_0", "test/ece/dataloader_idx_0", "test/entropy_mean/dataloader_idx_1"} <= set(
        metrics
    )
    trainer = make_trainer(None)
    trainer.test(model, loaders[0], verbose=False)  # one dataloader: the plain names, as ClassificationModule's
    assert float(trainer.callback_metrics["test/acc"]) == pytest.approx(6 / 8)


def norm_affine_names(model: PretrainedClassifier) -> set[str]:
    return {
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")
    }


def adapt(module: str | None, batches: int = 3) -> tuple[PretrainedClassifier, dict[str, torch.Tensor], list]:
    model = PretrainedClassifier(tiny_wrn(), DataConfig((3, 32, 32), MEAN, STD))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tta = TestTimeAdaptation("tent", module=module, keep_adapted=True, lr=0.05)
    loader = DataLoader(TensorDataset(images(8 * batches), torch.zeros(8 * batches, dtype=torch.long)), batch_size=8)
    make_trainer(None, callbacks=[tta]).test(model, loader, verbose=False)
    assert tta.method.num_classes == 10  # read from hparams.num_classes
    return model, before, [tta.online_error()]


@pytest.mark.parametrize("module", ["net", None])
def test_tent_on_a_robustbench_wrn_changes_only_norm_affine_parameters(module):
    model, before, _ = adapt(module)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == norm_affine_names(model)  # every BN weight/bias moved, nothing else (BN statistics restored)


def test_adapting_net_equals_adapting_the_whole_module():
    """The normalisation is inside `net`, so module="net" and the LightningModule itself adapt identically."""
    by_net, _, online_net = adapt("net")
    by_module, _, online_module = adapt(None)
    for key, value in by_net.state_dict().items():
        torch.testing.assert_close(value, by_module.state_dict()[key], rtol=0, atol=0, msg=key)
    assert online_net == online_module


class OnlyNormAffineChanged(L.Callback):
    """On each worker: Tent moved the norm affine parameters and nothing else, identically on both ranks."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}

    def on_test_start(self, trainer, pl_module) -> None:
        self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_test_end(self, trainer, pl_module) -> None:
        after = pl_module.state_dict()
        changed = {k for k in after if not torch.equal(after[k], self.before[k])}
        assert changed == norm_affine_names(pl_module), changed
        flat = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)


def test_tent_under_ddp_fork_adapts_norm_affine_parameters_identically_on_both_ranks():
    model = PretrainedClassifier(tiny_wrn(), DataConfig((3, 32, 32), MEAN, STD))
    tta = TestTimeAdaptation("tent", module="net", keep_adapted=True, lr=0.05)
    loader = DataLoader(TensorDataset(images(32), torch.zeros(32, dtype=torch.long)), batch_size=8)
    trainer = make_trainer(None, devices=2, strategy="ddp_fork", callbacks=[tta, OnlyNormAffineChanged()])
    trainer.test(model, loader, verbose=False)


def test_name_based_exclusions_read_names_inside_the_wrappers(tmp_path):
    """SAR/DeYO skip a timm ResNet's layer4 by name: seen through PretrainedClassifier and NormalizedClassifier."""
    from entreg.tta.norm import ALL_NORMS, SAR_EXCLUDE, collect_norm_params, network_root

    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "r.pth")
    model = PretrainedClassifier.timm("resnet10t", tmp_path / "r.pth")
    assert network_root(model) == ("net.model", model.net.model) and network_root(model.net)[0] == "model"
    collect_norm_params(model, ALL_NORMS, exclude=SAR_EXCLUDE)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("net.model.layer3.") for n in names) and not any("layer4" in n for n in names)
