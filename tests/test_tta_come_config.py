"""``method=tent_come`` adapts what COME's reference adapts (issue 17, item 9): the affine parameters of
BatchNorm2d, GroupNorm and LayerNorm (BlueWhaleLab/COME@5499c29, ``tent_come.py`` ``collect_params``), so a
GroupNorm model and a ViT adapt through the composed config instead of failing."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from tests.helpers import make_trainer


def compose_tent_come():
    from hydra import compose, initialize_config_module

    with initialize_config_module("entreg.configs", version_base="1.3"):
        return compose("adapt", overrides=["method=tent_come", "ckpt_path=unused", "paths.output_dir=unused"])


class Wrapped(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def test_step(self, batch, batch_idx):
        return self(batch[0])


def group_norm_net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
    return nn.Sequential(*layers, nn.GroupNorm(4, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def small_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8, depth=2
    )


@pytest.mark.parametrize(("build", "norm", "layers"), [(group_norm_net, nn.GroupNorm, 2), (small_vit, nn.LayerNorm, 5)])
def test_the_tent_come_config_adapts_groupnorm_and_layernorm_models(tmp_path, build, norm, layers):
    cfg = compose_tent_come()
    assert list(cfg.method.norm_types) == ["batchnorm2d", "groupnorm", "layernorm"] and cfg.method.entropy == "come"
    tta = instantiate(cfg.method, _convert_="all", keep_adapted=True)  # to compare the weights afterwards
    assert isinstance(tta, TestTimeAdaptation) and tta.method_name == "tent"
    model = Wrapped(build())
    source = copy.deepcopy(model.net.state_dict())
    norms = {n for n, m in model.net.named_modules() if isinstance(m, norm)}
    assert len(norms) == layers
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    make_trainer(tmp_path, callbacks=[tta]).test(model, DataLoader(TensorDataset(x), batch_size=8), verbose=False)
    assert tta.method.entropy_kind == "come"
    adapted = {n.removeprefix("net.").rsplit(".", 1)[0] for n, p in model.named_parameters() if id(p) in
               {id(q) for q in tta.method.params}}  # fmt: skip
    assert adapted == norms  # every norm layer, as the reference (no exclusions)
    changed = {k.rsplit(".", 1)[0] for k, v in model.net.state_dict().items() if not torch.equal(v, source[k])}
    assert changed and changed <= norms
