"""Backbones by name: shapes, options, and the error for an unknown name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entreg.nn import BACKBONES, build_backbone


@pytest.mark.parametrize(
    ("name", "kwargs", "in_chans", "size"),
    [
        ("small_cnn", {"norm": "batch"}, 1, 32),
        ("small_cnn", {"norm": "group", "act_layer": "gelu"}, 3, 8),
        ("resnet18", {"cifar_stem": True}, 3, 32),
        ("resnet18", {"norm": "group"}, 1, 64),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 3, 32),
    ],
)
def test_builds_and_maps_images_to_logits(name, kwargs, in_chans, size):
    net = build_backbone(name, num_classes=7, in_chans=in_chans, **kwargs)
    assert net(torch.randn(2, in_chans, size, size)).shape == (2, 7)


def test_options_change_the_architecture():
    cifar = build_backbone("resnet18", 10, cifar_stem=True)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    gn = build_backbone("resnet18", 10, norm="group")
    assert isinstance(gn.bn1, nn.GroupNorm) and not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    small = build_backbone("small_cnn", 10, norm="group")
    assert any(isinstance(m, nn.GroupNorm) for m in small.modules())


def test_resnet50_builds_without_downloading():
    net = build_backbone("resnet50", 3, in_chans=1, cifar_stem=True)
    assert net.fc.out_features == 3 and net.conv1.in_channels == 1


def test_small_cnn_follows_timm_api():
    net = build_backbone("small_cnn", 10, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(net.forward_head(net.forward_features(x)), net(x))
    net.reset_classifier(4)
    assert net(x).shape == (2, 4) and net.get_classifier().out_features == 4


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet19", 10)
    message = str(info.value)
    for name in BACKBONES:
        assert name in message
    assert "timm.list_models()" in message and "Close matches" in message


def test_bad_norm_and_pretrained_small_cnn():
    with pytest.raises(ValueError, match="norm must be one of"):
        build_backbone("small_cnn", 10, norm="layer")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("small_cnn", 10, pretrained=True)
