"""Classifier backbones built by name: entreg's small CNN, torchvision ResNets, any timm model.

Every backbone maps images (N, in_chans, H, W) to logits (N, num_classes). Nothing is
downloaded unless ``pretrained=True`` is asked for.

Example:
    >>> net = build_backbone("small_cnn", num_classes=10, in_chans=1, norm="group")
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["BACKBONES", "SmallCNN", "build_backbone", "register_backbone"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_NORMS = ("batch", "group")


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a backbone builder ``fn(num_classes, in_chans, pretrained, **kwargs)`` under its name."""
    BACKBONES[fn.__name__] = fn
    return fn


def _norm_layer(norm: str, num_groups: int = 8) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(min(num_groups, channels), channels)
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


class SmallCNN(nn.Module):
    """A small CNN for 8x8 to 64x64 images: per stage conv3x3-norm-act and a 2x2 max-pool,
    then global average pooling and a linear classifier. Follows timm's model API
    (``forward_features``, ``forward_head``, ``reset_classifier``, ``act_layer=``)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        norm: str = "batch",
        act_layer: str | type[nn.Module] = "relu",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        from timm.layers import get_act_layer

        make_norm, act = _norm_layer(norm), get_act_layer(act_layer)
        layers: list[nn.Module] = []
        chans = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(chans, width, 3, padding=1, bias=False),
                make_norm(width),
                act(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            chans = width
        self.features = nn.Sequential(*layers)
        self.num_features = chans
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chans, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)


@register_backbone
def small_cnn(num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError("small_cnn has no pretrained weights; train it or load an entreg checkpoint")
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, **kwargs)


def _torchvision_resnet(
    arch: str, num_classes: int, in_chans: int, pretrained: bool, cifar_stem: bool = False, norm: str = "batch"
) -> nn.Module:
    import torchvision

    weights = "DEFAULT" if pretrained else None
    extra = {} if norm == "batch" else {"norm_layer": _norm_layer(norm, num_groups=32)}
    net = getattr(torchvision.models, arch)(weights=weights, **extra)
    if cifar_stem:  # 3x3 stride-1 stem, no max-pool: the usual ResNet for 32x32 images
        net.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    if num_classes != net.fc.out_features or not pretrained:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


@register_backbone
def resnet18(num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18; ``cifar_stem=True`` for 32x32 inputs, ``norm="group"`` for GroupNorm."""
    return _torchvision_resnet("resnet18", num_classes, in_chans, pretrained, **kwargs)


@register_backbone
def resnet50(num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-50; ``cifar_stem=True`` for 32x32 inputs, ``norm="group"`` for GroupNorm."""
    return _torchvision_resnet("resnet50", num_classes, in_chans, pretrained, **kwargs)


def build_backbone(
    name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build a classifier by name: an entreg backbone (``BACKBONES``) or any timm model.

    Args:
        name: ``small_cnn``, ``resnet18``, ``resnet50`` or a timm model name
            (e.g. ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=4``).
        num_classes: output classes.
        in_chans: input channels.
        pretrained: load published weights (needs a network; off by default).
        **kwargs: passed to the builder (e.g. ``norm``, ``cifar_stem``, ``act_layer``, ``img_size``).

    Raises:
        ValueError: unknown name; the message lists entreg's backbones and close timm names.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name in BACKBONES:
        return BACKBONES[name](num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(BACKBONES) + timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown backbone {name!r}. Valid names: {', '.join(sorted(BACKBONES))}, or any of the "
            f"{len(timm.list_models())} timm models in timm.list_models().{hint}"
        )
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
