"""Denoisers for diffusion and flow models with one call, ``denoiser(x, t, class_labels=None) -> Tensor`` of
``x``'s shape: an MLP for low-dimensional data and diffusers' ``UNet2DModel`` for images.

Both are unconditional by default; with ``num_classes`` they learn one embedding per class plus a "null" class
(index ``num_classes``), added to the time embedding. ``class_labels`` (B,) of ints in [0, num_classes] selects
them; None means the null class (for unconditional use, e.g. after training with label dropout).

Both have ``sample_shape`` (the shape of one sample) and ``spec()``, a plain dict that
:func:`build_denoiser` turns back into the same architecture (stored in diffusion checkpoints).

Example:
    >>> import torch
    >>> mlp = MLPDenoiser(dim=2, hidden=32)
    >>> mlp(torch.zeros(5, 2), torch.tensor(10)).shape
    torch.Size([5, 2])
    >>> build_denoiser(mlp.spec()).sample_shape
    (2,)
    >>> conditional = MLPDenoiser(dim=2, hidden=32, num_classes=3)
    >>> conditional(torch.zeros(2, 2), torch.tensor(10), class_labels=torch.tensor([0, 3])).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DENOISERS",
    "MLPDenoiser",
    "UNet2DDenoiser",
    "build_denoiser",
    "denoiser_from_checkpoint",
    "sinusoidal_embedding",
    "unet2d",
]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding of timesteps ``t`` (B,): ``[sin(t f_i), cos(t f_i)]`` with frequencies
    ``f_i = max_period^(-i / (dim/2))``, shape (B, dim) (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def _batch_timesteps(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(batch) if t.ndim == 0 else t


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"num_classes must be None or >= 1, got {num_classes!r}")


def _class_indices(class_labels: Tensor | None, num_classes: int | None, batch: int, device: torch.device) -> Tensor:
    """Embedding rows for ``class_labels`` (B,) in [0, num_classes]; None gives the null class ``num_classes``.
    (Not range-checked here, to avoid a host sync: the embedding rejects out-of-range rows.)"""
    if num_classes is None:
        raise ValueError("this denoiser is unconditional (num_classes=None) but got class_labels")
    if class_labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
    if labels.shape != (batch,):
        raise ValueError(f"expected class_labels of shape ({batch},), got {tuple(labels.shape)}")
    return labels


class MLPDenoiser(nn.Module):
    """A residual MLP ``(x, t) -> output`` for vector data, with a sinusoidal time embedding added to every
    hidden layer. Inputs of any shape ``(B, *shape)`` with ``prod(shape) == dim`` are flattened and the
    output has their shape (so it also serves small images).

    Args:
        dim: dimension of one (flattened) sample.
        hidden: width of the hidden layers.
        layers: number of residual hidden layers (>= 1).
        time_embedding: size of the sinusoidal embedding of ``t`` (even).
        shape: the shape of one sample (``sample_shape``), ``(dim,)`` by default.
        num_classes: learn ``num_classes + 1`` class embeddings (the last is the null class), added to the
            time embedding; None: unconditional.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        layers: int = 3,
        time_embedding: int = 64,
        shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        shape = (dim,) if shape is None else tuple(int(s) for s in shape)
        _check_num_classes(num_classes)
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        if time_embedding < 2 or time_embedding % 2:
            raise ValueError(f"time_embedding must be even and >= 2, got {time_embedding}")
        if math.prod(shape) != dim:
            raise ValueError(f"shape {shape} does not hold dim={dim} values")
        self._kwargs = {"dim": dim, "hidden": hidden, "layers": layers, "time_embedding": time_embedding}
        self._kwargs["shape"] = list(shape)
        if num_classes is not None:  # older specs have no key, so they rebuild as before
            self._kwargs["num_classes"] = num_classes
        self.dim, self.time_embedding, self.sample_shape = dim, time_embedding, shape
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_embedding, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = None if num_classes is None else nn.Embedding(num_classes + 1, hidden)
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.output = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``x`` (B, *shape), ``t`` (B,) or a scalar, ``class_labels`` (B,) (conditional denoisers; None: the
        null class): (B, *shape)."""
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected inputs of {self.dim} values per sample, got shape {tuple(x.shape)}")
        temb = self.time_mlp(sinusoidal_embedding(_batch_timesteps(t, len(x), x.device), self.time_embedding))
        if self.class_embedding is not None or class_labels is not None:
            temb = temb + self.class_embedding(_class_indices(class_labels, self.num_classes, len(x), x.device))
        h = self.input(flat)
        for block in self.blocks:
            h = h + block(self.act(h + temb))
        return self.output(self.act(h)).reshape(x.shape)

    def spec(self) -> dict[str, Any]:
        """``{"name": "mlp", "kwargs": ...}`` for :func:`build_denoiser`."""
        return {"name": "mlp", "kwargs": dict(self._kwargs)}


class UNet2DDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` behind the uniform call: ``forward(x, t, class_labels=None)`` returns its
    ``.sample``.

    Args:
        unet: the ``UNet2DModel``.
        num_classes: for a class-conditional ``unet`` (``num_class_embeds == num_classes + 1``, the last row the
            null class that ``class_labels=None`` selects); None: unconditional.
    """

    def __init__(self, unet: nn.Module, num_classes: int | None = None) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        embeds = unet.config.get("num_class_embeds")
        if embeds != (None if num_classes is None else num_classes + 1):
            raise ValueError(
                f"num_classes={num_classes} needs a UNet2DModel with num_class_embeds="
                f"{None if num_classes is None else num_classes + 1} (the null class included), got {embeds}"
            )
        self.unet, self.num_classes = unet, num_classes

    @classmethod
    def from_config(cls, config: dict[str, Any], num_classes: int | None = None) -> UNet2DDenoiser:
        """Rebuild from a ``UNet2DModel`` config (randomly initialised)."""
        from diffusers import UNet2DModel

        return cls(UNet2DModel.from_config(config), num_classes)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, height, width)

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``x`` (B, C, H, W), ``t`` (B,) or a scalar, ``class_labels`` (B,) (conditional denoisers; None: the
        null class): (B, C_out, H, W)."""
        labels = None
        if self.num_classes is not None or class_labels is not None:
            labels = _class_indices(class_labels, self.num_classes, len(x), x.device)
        return self.unet(x, _batch_timesteps(t, len(x), x.device), class_labels=labels).sample

    def spec(self) -> dict[str, Any]:
        """``{"name": "unet2d", "kwargs": {"config": ...}}`` (and ``"num_classes"`` when conditional) for
        :func:`build_denoiser`."""
        config = {key: value for key, value in self.unet.config.items() if not key.startswith("_")}
        kwargs: dict[str, Any] = {"config": config}
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        return {"name": "unet2d", "kwargs": kwargs}


def unet2d(
    sample_size: int,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
    num_classes: int | None = None,
    **kwargs: Any,
) -> UNet2DDenoiser:
    """A small diffusers ``UNet2DModel`` (one resolution per entry of ``block_out_channels``, self-attention at
    the lowest resolution and in the middle block when ``attention``), wrapped as :class:`UNet2DDenoiser`.
    With ``num_classes``, class-conditional: ``num_class_embeds = num_classes + 1`` (the last the null class).
    ``kwargs`` go to ``UNet2DModel`` (e.g. ``dropout``).

    Example:
        >>> import torch
        >>> net = unet2d(8, in_channels=1, block_out_channels=(8, 16))
        >>> net(torch.zeros(2, 1, 8, 8), torch.tensor([1, 500])).shape
        torch.Size([2, 1, 8, 8])
        >>> conditional = unet2d(8, block_out_channels=(8, 16), num_classes=10)
        >>> conditional(torch.zeros(2, 1, 8, 8), torch.tensor([1, 500]), class_labels=torch.tensor([3, 10])).shape
        torch.Size([2, 1, 8, 8])
    """
    from diffusers import UNet2DModel

    _check_num_classes(num_classes)
    levels = len(block_out_channels)
    if levels < 1 or sample_size % 2 ** (levels - 1):
        raise ValueError(
            f"sample_size={sample_size} must be divisible by 2^(levels - 1) for {levels} levels of block_out_channels"
        )
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"every block_out_channels {tuple(block_out_channels)} must be divisible by {norm_num_groups=}"
        )
    down = ["DownBlock2D"] * levels
    if attention:
        down[-1] = "AttnDownBlock2D"
    up = ["AttnUpBlock2D" if block == "AttnDownBlock2D" else "UpBlock2D" for block in reversed(down)]
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else out_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        add_attention=attention,
        norm_num_groups=norm_num_groups,
        num_class_embeds=None if num_classes is None else num_classes + 1,
        **kwargs,
    )
    return UNet2DDenoiser(unet, num_classes)


DENOISERS: dict[str, Callable[..., nn.Module]] = {"mlp": MLPDenoiser, "unet2d": UNet2DDenoiser.from_config}


def build_denoiser(spec: dict[str, Any]) -> nn.Module:
    """The denoiser described by ``spec`` (from a denoiser's ``spec()``), randomly initialised."""
    name = spec.get("name")
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; known: {sorted(DENOISERS)}")
    return DENOISERS[name](**spec.get("kwargs", {}))


def denoiser_from_checkpoint(path: str | Path) -> nn.Module:
    """The entreg denoiser (randomly initialised) whose spec a DiffusionModule or FlowMatchingModule checkpoint
    stores under ``entreg_denoiser``."""
    spec = torch.load(path, map_location="cpu", weights_only=True).get("entreg_denoiser")
    if spec is None:
        raise ValueError(f"{path} stores no denoiser spec: pass the architecture it was trained with")
    return build_denoiser(spec)
