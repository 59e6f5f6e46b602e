"""SAR's and DeYO's name-based exclusions on wrapped networks: a LightningModule around a timm model
adapts exactly the norm layers the references adapt on the bare model (issue 17, item 2). Before, the
final norm of a ViT, ``backbone.norm`` / ``net.norm``, escaped the exact-name rule ``norm``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from entreg.modules import ClassificationModule
from entreg.nn.backbones import build_backbone
from entreg.tta import SAR, DeYO
from entreg.tta.norm import network_root

timm = pytest.importorskip("timm")

# name -> (builder kwargs, norm layers the references' collect_params adapts on the bare model, as the README says)
ARCHS = {
    "vit_tiny_patch16_224": ({"img_size": 32}, 18),  # 12 blocks: blocks.9-11 and the final norm stay frozen
    "convnext_atto": ({}, 17),
    "resnet18": ({}, 15),  # ClassificationModule builds torchvision's, the user wrapper timm's: same names
}


class UserWrapper(L.LightningModule):
    """A user's LightningModule: the network as ``self.net`` and a parameter-free metric beside it."""

    def __init__(self, name: str, kwargs: dict) -> None:
        super().__init__()
        self.net = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adapted_layers(model: nn.Module, prefix: str = "") -> list[str]:
    """Names (without ``prefix``) of the modules whose parameters the method trains, in order."""
    names = [n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad]
    return [n.removeprefix(prefix) for n in dict.fromkeys(names)]


@pytest.mark.parametrize("method", [SAR, DeYO])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_wrapped_networks_adapt_the_layers_of_the_bare_network(arch, method):
    kwargs, count = ARCHS[arch]
    torch.manual_seed(0)
    timm_bare = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)
    method(timm_bare, num_classes=10)
    expected = adapted_layers(timm_bare)
    assert len(expected) == count
    if arch == "vit_tiny_patch16_224":
        assert len(timm_bare.blocks) == 12 and "norm" not in expected and "blocks.8.norm2" in expected
        assert not any(n.startswith(("blocks.9.", "blocks.10.", "blocks.11.")) for n in expected)

    user = UserWrapper(arch, kwargs)
    method(user, num_classes=10)
    assert adapted_layers(user, "net.") == expected

    module = ClassificationModule(arch, num_classes=10, in_chans=3, backbone_kwargs=kwargs)
    bare = build_backbone(arch, 10, 3, **kwargs)  # torchvision's resnet18 for "resnet18"
    method(bare, num_classes=10)
    method(module, num_classes=10)
    assert adapted_layers(module, "backbone.") == adapted_layers(bare) and len(adapted_layers(bare)) == count


def test_the_forward_still_runs_through_the_whole_module():
    torch.manual_seed(0)
    module = ClassificationModule(
        "vit_tiny_patch16_224", num_classes=10, in_chans=3, backbone_kwargs={"img_size": 32}, output_activation="era"
    ).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, raw = module(x), module.backbone(x)
    assert not torch.allclose(expected, raw)  # ERA changes the logits
    sar = SAR(module, num_classes=10)
    assert network_root(module) == ("backbone", module.backbone)
    logits, _ = sar.adapt(x)
    torch.testing.assert_close(logits, expected)


def test_network_root_and_exact_names_in_full():
    net = nn.Sequential()
    net.pre, net.norm, net.head_norm = nn.LayerNorm(4), nn.LayerNorm(4), nn.LayerNorm(4)
    wrapper = nn.Module()
    wrapper.net, wrapper.act = net, nn.ReLU()
    assert network_root(wrapper) == ("net", net)
    tta = SAR(wrapper, num_classes=4, exclude_names=["norm", "net.head_norm"])  # relative, or in full
    assert [id(p) for p in tta.params] == [id(net.pre.weight), id(net.pre.bias)]
    wrapper.scale = nn.Parameter(torch.ones(()))  # a parameter of its own: the wrapper is the network
    assert network_root(wrapper) == ("", wrapper)
