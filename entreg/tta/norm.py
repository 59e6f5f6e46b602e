"""Which parameters test-time adaptation trains, and batch statistics for BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = [
    "ALL_NORMS",
    "BATCHNORM_ONLY",
    "SAR_EXCLUDE",
    "SAR_EXCLUDE_FINAL",
    "collect_norm_params",
    "force_batch_statistics",
]

BATCHNORM_ONLY: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,)  # Tent, EATA, OSTTA
ALL_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)  # SAR, DeYO
# SAR and DeYO leave the top of the network frozen: ResNet ``layer4``, ViT-B ``blocks.9-11`` and the
# final ``norm`` (matched as substrings of module names, as the reference code does)
SAR_EXCLUDE = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")
SAR_EXCLUDE_FINAL = ("norm",)  # whole last name segment: ``norm`` or ``backbone.norm``


def _excluded(name: str, exclude: Sequence[str], exclude_final: Sequence[str]) -> bool:
    return any(e in name for e in exclude) or any(name == e or name.endswith(f".{e}") for e in exclude_final)


def collect_norm_params(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    exclude: Sequence[str] = (),
    exclude_final: Sequence[str] = (),
) -> list[nn.Parameter]:
    """Freeze ``model`` except the affine weight and bias of its normalisation layers of ``types``;
    skip modules whose name contains a string of ``exclude`` or ends with a name segment of
    ``exclude_final``. Returns the trainable parameters in module order.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.GroupNorm(1, 2))
        >>> len(collect_norm_params(net, BATCHNORM_ONLY)), len(collect_norm_params(net, ALL_NORMS, exclude_final=["2"]))
        (2, 2)
    """
    model.requires_grad_(False)
    params = []
    for name, module in model.named_modules():
        if isinstance(module, types) and not _excluded(name, exclude, exclude_final):
            for p in (module.weight, module.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    return params


def force_batch_statistics(model: nn.Module) -> int:
    """Make every ``BatchNorm2d`` normalise with the statistics of the current batch, in train and
    eval mode alike, by dropping its running buffers (what every reference TTA implementation does).
    Returns the number of layers changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            count += 1
    return count
