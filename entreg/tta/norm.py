"""Which parameters test-time adaptation trains, and batch statistics for BatchNorm."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "ALL_NORMS",
    "BATCHNORM_ONLY",
    "NORM_TYPES",
    "SAR_EXCLUDE",
    "SAR_EXCLUDE_NAMES",
    "BatchNormState",
    "collect_norm_params",
    "describe_norm_layers",
    "force_batch_statistics",
    "network_root",
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
# Names are relative to :func:`network_root`, so a wrapper (``backbone.norm``, ``net.norm``) changes nothing.
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


def network_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The network inside ``model`` that maps inputs to logits, with wrappers seen through: descend
    while a module has no parameters of its own and exactly one child holds all of its parameters.
    Returns (its dotted name in ``model``, ``""`` for ``model`` itself; the module). A LightningModule
    with ``self.backbone = timm.create_model(...)`` (plus parameter-free metrics or activations) gives
    the timm model, so name-based rules read ``norm``, not ``backbone.norm``.

    Example:
        >>> vit_like = nn.Sequential()
        >>> vit_like.blocks, vit_like.norm = nn.Linear(2, 2), nn.LayerNorm(2)
        >>> wrapper = nn.Module()
        >>> wrapper.net, wrapper.act = vit_like, nn.ReLU()
        >>> network_root(wrapper)[0], network_root(vit_like)[0]
        ('net', '')
    """
    prefix, module = "", model
    while next(module.parameters(recurse=False), None) is None:
        holders = [(n, child) for n, child in module.named_children() if next(child.parameters(), None) is not None]
        if len(holders) != 1:
            break
        name, module = holders[0]
        prefix = f"{prefix}.{name}" if prefix else name
    return prefix, module


def _excluded(name: str, full_name: str, exclude: Sequence[str], exclude_names: Sequence[str]) -> bool:
    return any(e in name for e in exclude) or name in exclude_names or full_name in exclude_names


def collect_norm_params(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    exclude: Sequence[str] = (),
    exclude_names: Sequence[str] = (),
) -> list[nn.Parameter]:
    """Freeze ``model`` except the affine weight and bias of its normalisation layers of ``types``
    (subclasses included, e.g. timm's ``LayerNorm2d``); skip modules whose name contains a string of
    ``exclude`` or equals a name of ``exclude_names``. Names are relative to :func:`network_root`
    (wrappers seen through, as if the references were given the bare network); an exact name may also
    be given in full from ``model``. Returns the trainable parameters in module order.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.GroupNorm(1, 2))
        >>> len(collect_norm_params(net, BATCHNORM_ONLY)), len(collect_norm_params(net, ALL_NORMS, exclude_names=["2"]))
        (2, 2)
    """
    model.requires_grad_(False)
    prefix, root = network_root(model)
    params = []
    for name, module in root.named_modules():
        full_name = f"{prefix}.{name}" if prefix and name else prefix or name
        if isinstance(module, types) and not _excluded(name, full_name, exclude, exclude_names):
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


def _batchnorms(model: nn.Module, types: Sequence[type[nn.Module]]) -> list[_BatchNorm]:
    batchnorms = tuple(t for t in types if issubclass(t, _BatchNorm))
    return [m for m in model.modules() if isinstance(m, batchnorms)] if batchnorms else []


@dataclass
class BatchNormState:
    """What :func:`force_batch_statistics` changes in one BatchNorm layer, to put it back: its
    ``track_running_stats`` flag and its running buffers (the tensors themselves; dropping them from
    the layer leaves them untouched).

    Example:
        >>> bn = nn.BatchNorm2d(3)
        >>> states = BatchNormState.capture(bn, BATCHNORM_ONLY)
        >>> force_batch_statistics(bn), bn.running_mean
        (1, None)
        >>> for state in states:
        ...     state.restore()
        >>> sorted(bn.state_dict()), bn.track_running_stats
        (['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'], True)
    """

    module: _BatchNorm
    track_running_stats: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    @classmethod
    def capture(cls, model: nn.Module, types: Sequence[type[nn.Module]] = BATCHNORM_ONLY) -> list[BatchNormState]:
        """The state of each BatchNorm layer of ``model`` that :func:`force_batch_statistics` with ``types`` changes."""
        return [
            cls(m, m.track_running_stats, m.running_mean, m.running_var, _clone(m.num_batches_tracked))
            for m in _batchnorms(model, types)
        ]

    def restore(self) -> None:
        """Put the flag and the running buffers back (on the device and dtype of the layer's parameters)."""
        module = self.module
        weight = next(module.parameters(), None)  # the model may have moved since (``.to(device)``)
        module.track_running_stats = self.track_running_stats
        for name in ("running_mean", "running_var"):
            value = getattr(self, name)
            if value is not None and weight is not None:
                value = value.to(device=weight.device, dtype=weight.dtype)
            setattr(module, name, value)
        current = module.num_batches_tracked
        if current is not None and self.num_batches_tracked is not None:
            current.copy_(self.num_batches_tracked)
        else:
            module.num_batches_tracked = self.num_batches_tracked


def _clone(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def force_batch_statistics(model: nn.Module, types: Sequence[type[nn.Module]] = BATCHNORM_ONLY) -> int:
    """Make every BatchNorm layer of ``types`` (default ``BatchNorm2d``, what every reference TTA
    implementation changes) normalise with the statistics of the current batch, in train and eval mode
    alike, by dropping its running buffers. Returns the number of layers changed."""
    modules = _batchnorms(model, types)
    for module in modules:
        module.track_running_stats = False
        module.running_mean = None
        module.running_var = None
    return len(modules)
