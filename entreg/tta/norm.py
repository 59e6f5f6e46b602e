"""Which parameters test-time adaptation trains, and batch statistics for BatchNorm."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "ALL_NORMS",
    "BATCHNORM_ONLY",
    "NORM_TYPES",
    "SAR_EXCLUDE",
    "SAR_EXCLUDE_NAMES",
    "collect_norm_params",
    "describe_norm_layers",
    "force_batch_statistics",
    "resolve_norm_types",
]

NORM_TYPES: dict[str, type[nn.Module]] = {
    "batchnorm1d": nn.BatchNorm1d,
    "batchnorm2d": nn.BatchNorm2d,
    "batchnorm3d": nn.BatchNorm3d,
    "layernorm": nn.LayerNorm,
    "groupnorm": nn.GroupNorm,
}
BATCHNORM_ONLY: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,)  # Tent, EATA, OSTTA
ALL_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)  # SAR, DeYO
# SAR's and DeYO's ``collect_params`` leave the top of the network frozen: a module is skipped when its
# name contains one of SAR_EXCLUDE (ResNet ``layer4``, ViT-B ``blocks.9-11``, anything inside a
# module called ``...norm.``) or is exactly one of SAR_EXCLUDE_NAMES (the final ``norm`` of a timm ViT).
# ``layer1.norm`` contains neither ``norm.`` nor equals ``norm``: it is adapted, as in the references.
SAR_EXCLUDE: tuple[str, ...] = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")
SAR_EXCLUDE_NAMES: tuple[str, ...] = ("norm",)


def resolve_norm_types(types: Sequence[type[nn.Module] | str]) -> tuple[type[nn.Module], ...]:
    """Normalisation layer classes from classes or names of :data:`NORM_TYPES` (case-insensitive).

    Example:
        >>> resolve_norm_types(["BatchNorm1d", nn.LayerNorm])
        (<class 'torch.nn.modules.batchnorm.BatchNorm1d'>, <class 'torch.nn.modules.normalization.LayerNorm'>)
    """
    if isinstance(types, (str, type)):
        types = [types]
    resolved = []
    for t in types:
        if isinstance(t, str):
            if t.lower() not in NORM_TYPES:
                raise ValueError(f"unknown norm type {t!r}; valid: {sorted(NORM_TYPES)}")
            t = NORM_TYPES[t.lower()]
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"norm types are nn.Module classes or names of {sorted(NORM_TYPES)}, got {t!r}")
        resolved.append(t)
    if not resolved:
        raise ValueError("norm_types is empty: name at least one normalisation layer type")
    return tuple(resolved)


def _excluded(name: str, exclude: Sequence[str], exclude_names: Sequence[str]) -> bool:
    return any(e in name for e in exclude) or name in exclude_names


def collect_norm_params(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    exclude: Sequence[str] = (),
    exclude_names: Sequence[str] = (),
) -> list[nn.Parameter]:
    """Freeze ``model`` except the affine weight and bias of its normalisation layers of ``types``
    (subclasses included, e.g. timm's ``LayerNorm2d``); skip modules whose name contains a string of
    ``exclude`` or equals a name of ``exclude_names``. Returns the trainable parameters in module order.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.GroupNorm(1, 2))
        >>> len(collect_norm_params(net, BATCHNORM_ONLY)), len(collect_norm_params(net, ALL_NORMS, exclude_names=["2"]))
        (2, 2)
    """
    model.requires_grad_(False)
    params = []
    for name, module in model.named_modules():
        if isinstance(module, types) and not _excluded(name, exclude, exclude_names):
            for p in (module.weight, module.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    return params


def describe_norm_layers(model: nn.Module) -> str:
    """The normalisation layers of ``model`` by class, e.g. ``"LayerNorm x 4, BatchNorm1d x 2"``
    (``"none"`` without any), for error messages."""
    norms = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RMSNorm)
    counts = Counter(type(m).__name__ for m in model.modules() if isinstance(m, norms))
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common()) or "none"


def force_batch_statistics(model: nn.Module, types: Sequence[type[nn.Module]] = BATCHNORM_ONLY) -> int:
    """Make every BatchNorm layer of ``types`` (default ``BatchNorm2d``, what every reference TTA
    implementation changes) normalise with the statistics of the current batch, in train and eval mode
    alike, by dropping its running buffers. Returns the number of layers changed."""
    batchnorms = tuple(t for t in types if issubclass(t, _BatchNorm))
    count = 0
    for module in model.modules():
        if batchnorms and isinstance(module, batchnorms):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            count += 1
    return count
