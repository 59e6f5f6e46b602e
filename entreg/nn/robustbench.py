"""RobustBench's CIFAR-10-C / CIFAR-100-C source models, loadable from RobustBench's checkpoint files without
the ``robustbench`` package (it pins an old timm).

The architectures are written from their published structure (Zagoruyko & Komodakis' pre-activation
WideResNet as in TRADES; the CIFAR ResNeXt of AugMix, Hendrycks et al. 2020) so that their ``state_dict`` keys,
key order and shapes are exactly RobustBench's: its files load without renaming. Registry
(:data:`ROBUSTBENCH_MODELS`, by ``(dataset, name)``):

- ``Standard`` (cifar10): WideResNet-28-10 on [0, 1] inputs, 36,479,194 parameters;
- ``Hendrycks2020AugMix_WRN`` (cifar10, cifar100): WideResNet-40-2 normalising inside with (x - 0.5) / 0.5,
  2,243,546 / 2,255,156 parameters;
- ``Hendrycks2020AugMix_ResNeXt`` (cifar10, cifar100): ResNeXt-29 with 4 groups of width 32, normalising inside
  the same way, 6,807,882 / 6,900,132 parameters.

RobustBench keeps them at ``<model_dir>/<dataset>/corruptions/<name>.pt``. :func:`load_robustbench` reads a
dict with ``state_dict`` (or ``model_state_dict``/``model``) or a bare state_dict, strips ``module.`` and
``model.`` prefixes and accepts the AugMix files' missing ``mu``/``sigma`` (fixed at 0.5), as RobustBench's
``load_model`` does; every other missing, unexpected or misshapen key is an error naming the file.

Example:
    >>> net = WideResNet(depth=10, widen_factor=1)  # the smallest member of the family
    >>> net(torch.rand(2, 3, 32, 32)).shape, len(net.state_dict())
    (torch.Size([2, 10]), 46)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entreg.nn.pretrained import DataConfig, load_checked, read_weights_file, unwrap_state_dict

__all__ = [
    "DATASETS",
    "ROBUSTBENCH_MODELS",
    "AugMixResNeXt",
    "AugMixWideResNet",
    "CifarResNeXt",
    "RobustBenchModel",
    "WideResNet",
    "load_robustbench",
    "robustbench_architecture",
    "robustbench_model",
]

DATASETS = {"cifar10": 10, "cifar100": 100}


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan out), BatchNorm 1/0, zero linear biases: the published initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- WideResNet (pre-activation) -----------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut. When the width changes, the
    shortcut is a 1x1 convolution of the *activated* input (``convShortcut``); else the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.equal_in_out:
            out, shortcut = self.relu1(self.bn1(x)), x
        else:
            x = self.relu1(self.bn1(x))
            out, shortcut = x, self.convShortcut(x)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return shortcut + out


class WideResNetGroup(nn.Module):
    """``blocks`` WideBasicBlocks in ``layer`` (an nn.Sequential); only the first changes width and stride."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
              for i in range(blocks))
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen_factor`` for 32x32 images: a 3x3 stem with 16 channels, three groups of
    ``(depth - 4) / 6`` pre-activation blocks of width 16k, 32k, 64k (strides 1, 2, 2), BN-ReLU, 8x8 average
    pooling and a linear classifier ``fc``. ``WideResNet(28, 10)`` is RobustBench's ``Standard``.

    Example:
        >>> WideResNet(depth=12)
        Traceback (most recent call last):
        ...
        ValueError: WideResNet depth must be 6n + 4 (10, 16, 22, 28, 34, 40, ...), got 12
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, 34, 40, ...), got {depth}")
        if widen_factor < 1 or num_classes < 2:
            raise ValueError(f"widen_factor must be >= 1 and num_classes >= 2, got {widen_factor}, {num_classes}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.num_features = widths[3]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideResNetGroup(blocks, widths[0], widths[1], 1)
        self.block2 = WideResNetGroup(blocks, widths[1], widths[2], 2)
        self.block3 = WideResNetGroup(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(F.avg_pool2d(x, 8).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class AugMixWideResNet(WideResNet):
    """WideResNet taking [0, 1] images and normalising them inside, ``(x - mu) / sigma`` with 0.5 each (buffers
    ``mu`` and ``sigma``, first in the state_dict): RobustBench's ``Hendrycks2020AugMix_WRN`` (WRN-40-2)."""

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10) -> None:
        super().__init__(depth, widen_factor, num_classes)
        self.register_buffer("mu", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("sigma", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward((x - self.mu) / self.sigma)


# ---- ResNeXt -------------------------------------------------------------------------------------------------


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce to ``D = cardinality * floor(planes * base_width / 64)`` channels, grouped 3x3 (the stride),
    1x1 expand to ``4 * planes``; BN after each, ReLU after the first two and after the residual sum."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, cardinality: int, base_width: int, stride: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        width = cardinality * math.floor(planes * base_width / 64)
        self.conv_reduce = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        out = F.relu(self.bn(self.conv_conv(out)), inplace=True)
        out = self.bn_expand(self.conv_expand(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(residual + out, inplace=True)


class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 images (AugMix's): a 3x3 stem with 64 channels, three stages of ``(depth - 2) / 9``
    bottlenecks (planes 64, 128, 256; strides 1, 2, 2; a 1x1 conv + BN ``downsample`` in each stage's first
    block), 8x8 average pooling and a linear ``classifier``. RobustBench's AugMix model is ``depth=29,
    cardinality=4, base_width=32``.

    Example:
        >>> CifarResNeXt(depth=11, cardinality=2, base_width=4)(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"CifarResNeXt depth must be 9n + 2 (11, 20, 29, ...), got {depth}")
        if cardinality < 1 or base_width < 1 or num_classes < 2:
            raise ValueError(
                f"cardinality and base_width must be >= 1, num_classes >= 2; got {cardinality}, {base_width}, "
                f"{num_classes}"
            )
        blocks = (depth - 2) // 9
        self.cardinality, self.base_width, self.num_classes = cardinality, base_width, num_classes
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.inplanes = 64
        self.stage_1 = self._make_stage(64, blocks, 1)
        self.stage_2 = self._make_stage(128, blocks, 2)
        self.stage_3 = self._make_stage(256, blocks, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.num_features = 256 * ResNeXtBottleneck.expansion
        self.classifier = nn.Linear(self.num_features, num_classes)
        _init_weights(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        layers = [ResNeXtBottleneck(self.inplanes, planes, self.cardinality, self.base_width, stride, downsample)]
        self.inplanes = out
        layers += [ResNeXtBottleneck(out, planes, self.cardinality, self.base_width, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        return self.stage_3(self.stage_2(self.stage_1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class AugMixResNeXt(CifarResNeXt):
    """CifarResNeXt normalising [0, 1] inputs inside with ``mu = sigma = 0.5`` (buffers, first in the
    state_dict): RobustBench's ``Hendrycks2020AugMix_ResNeXt``."""

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 10) -> None:
        super().__init__(depth, cardinality, base_width, num_classes)
        self.register_buffer("mu", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("sigma", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward((x - self.mu) / self.sigma)


# ---- registry and loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobustBenchModel:
    """A RobustBench corruption model: its ``name``, ``dataset``, ``architecture`` (in words), the ``build``
    function of the architecture (``num_classes`` -> module), and RobustBench's reported clean and
    corruption accuracy (%, mean over 15 corruptions x 5 severities)."""

    name: str
    dataset: str
    architecture: str
    build: Callable[[int], nn.Module]
    clean_acc: float
    corruptions_acc: float

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]

    @property
    def file(self) -> str:
        """Where RobustBench keeps it, relative to its ``model_dir``."""
        return f"{self.dataset}/corruptions/{self.name}.pt"


def _standard(num_classes: int) -> nn.Module:
    return WideResNet(28, 10, num_classes)


def _augmix_wrn(num_classes: int) -> nn.Module:
    return AugMixWideResNet(40, 2, num_classes)


def _augmix_resnext(num_classes: int) -> nn.Module:
    return AugMixResNeXt(29, 4, 32, num_classes)


ROBUSTBENCH_MODELS: dict[tuple[str, str], RobustBenchModel] = {
    (m.dataset, m.name): m
    for m in (
        RobustBenchModel("Standard", "cifar10", "WideResNet-28-10", _standard, 94.78, 73.46),
        RobustBenchModel("Hendrycks2020AugMix_WRN", "cifar10", "WideResNet-40-2, AugMix", _augmix_wrn, 95.08, 88.82),
        RobustBenchModel(
            "Hendrycks2020AugMix_ResNeXt", "cifar10", "ResNeXt-29 (4 x 32), AugMix", _augmix_resnext, 95.83, 89.09
        ),
        RobustBenchModel("Hendrycks2020AugMix_WRN", "cifar100", "WideResNet-40-2, AugMix", _augmix_wrn, 76.28, 64.11),
        RobustBenchModel(
            "Hendrycks2020AugMix_ResNeXt", "cifar100", "ResNeXt-29 (4 x 32), AugMix", _augmix_resnext, 78.90, 65.14
        ),
    )
}
OPTIONAL_KEYS = ("mu", "sigma")  # RobustBench's AugMix files lack them; its load_model tolerates exactly these


def _entry(name: str, dataset: str) -> RobustBenchModel:
    if dataset not in DATASETS:
        raise ValueError(f"RobustBench dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if (dataset, name) not in ROBUSTBENCH_MODELS:
        valid = sorted(n for d, n in ROBUSTBENCH_MODELS if d == dataset)
        raise ValueError(f"no RobustBench corruption model {name!r} for {dataset}; valid: {valid}")
    return ROBUSTBENCH_MODELS[(dataset, name)]


def robustbench_architecture(name: str, dataset: str = "cifar10") -> nn.Module:
    """The architecture of a registered model, randomly initialised (build it under ``torch.device("meta")`` to
    read keys and shapes without allocating).

    Example:
        >>> with torch.device("meta"):
        ...     net = robustbench_architecture("Standard")
        >>> sum(p.numel() for p in net.parameters())
        36479194
    """
    entry = _entry(name, dataset)
    return entry.build(entry.num_classes)


def _expected_format(entry: RobustBenchModel) -> str:
    return (
        f"RobustBench's {entry.dataset}/corruptions/{entry.name}.pt ({entry.architecture}): a torch.save'd dict with "
        "'state_dict' or a bare state_dict, keys optionally prefixed with 'module.' or 'model.'"
    )


def load_robustbench(
    name: str,
    dataset: str = "cifar10",
    file: str | Path = "",
    *,
    model: nn.Module | None = None,
    weights_only: bool = True,
) -> nn.Module:
    """A RobustBench corruption model with the weights of its checkpoint ``file``, in eval mode.

    Args:
        name, dataset: a key of :data:`ROBUSTBENCH_MODELS` (``Standard``/cifar10, ...).
        file: RobustBench's ``<model_dir>/<dataset>/corruptions/<name>.pt``.
        model: load into this module instead of the registry's architecture (same key layout, e.g. a smaller
            WideResNet); ``mu``/``sigma`` may be missing from the file when it has them.
        weights_only: ``torch.load``'s; ``False`` unpickles arbitrary objects (only for files you trust).

    Raises:
        ValueError: unknown name/dataset; FileNotFoundError: no file; :class:`~entreg.nn.pretrained.WeightsError`:
            an unreadable file (an HTML page from a failed Google Drive download is recognised) or keys/shapes that
            do not fit (listed).
    """
    entry = _entry(name, dataset)
    expected = _expected_format(entry)
    what = f"RobustBench {dataset} model {name!r}"
    state = unwrap_state_dict(read_weights_file(file, what, expected, weights_only=weights_only))
    net = entry.build(entry.num_classes) if model is None else model
    return load_checked(net, state, file, what, expected, optional=OPTIONAL_KEYS)


def robustbench_model(
    name: str, dataset: str = "cifar10", file: str | Path = "", *, weights_only: bool = True
) -> tuple[nn.Module, DataConfig]:
    """:func:`load_robustbench` with its preprocessing: 32x32 images in [0, 1] as they come, no normalisation
    outside the network (the AugMix models normalise inside, ``Standard`` takes [0, 1])."""
    net = load_robustbench(name, dataset, file, weights_only=weights_only)
    return net, DataConfig(input_size=(3, 32, 32))
