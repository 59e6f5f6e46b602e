"""Denoisers for diffusion models with one call, ``denoiser(x, t) -> Tensor`` of ``x``'s shape: an MLP for
low-dimensional data and diffusers' ``UNet2DModel`` for images.

Both have ``sample_shape`` (the shape of one sample) and ``spec()``, a plain dict that
:func:`build_denoiser` turns back into the same architecture (stored in diffusion checkpoints).

Example:
    >>> import torch
    >>> mlp = MLPDenoiser(dim=2, hidden=32)
    >>> mlp(torch.zeros(5, 2), torch.tensor(10)).shape
    torch.Size([5, 2])
    >>> build_denoiser(mlp.spec()).sample_shape
    (2,)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DENOISERS", "MLPDenoiser", "UNet2DDenoiser", "build_denoiser", "sinusoidal_embedding", "unet2d"]


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
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        layers: int = 3,
        time_embedding: int = 64,
        shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        shape = (dim,) if shape is None else tuple(int(s) for s in shape)
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        if time_embedding < 2 or time_embedding % 2:
            raise ValueError(f"time_embedding must be even and >= 2, got {time_embedding}")
        if math.prod(shape) != dim:
            raise ValueError(f"shape {shape} does not hold dim={dim} values")
        self._kwargs = {"dim": dim, "hidden": hidden, "layers": layers, "time_embedding": time_embedding}
        self._kwargs["shape"] = list(shape)
        self.dim, self.time_embedding, self.sample_shape = dim, time_embedding, shape
        self.time_mlp = nn.Sequential(nn.Linear(time_embedding, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.output = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x`` (B, *shape), ``t`` (B,) or a scalar: (B, *shape)."""
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected inputs of {self.dim} values per sample, got shape {tuple(x.shape)}")
        temb = self.time_mlp(sinusoidal_embedding(_batch_timesteps(t, len(x), x.device), self.time_embedding))
        h = self.input(flat)
        for block in self.blocks:
            h = h + block(self.act(h + temb))
        return self.output(self.act(h)).reshape(x.shape)

    def spec(self) -> dict[str, Any]:
        """``{"name": "mlp", "kwargs": ...}`` for :func:`build_denoiser`."""
        return {"name": "mlp", "kwargs": dict(self._kwargs)}


class UNet2DDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` behind the uniform call: ``forward(x, t)`` returns its ``.sample``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet2DDenoiser:
        """Rebuild from a ``UNet2DModel`` config (randomly initialised)."""
        from diffusers import UNet2DModel

        return cls(UNet2DModel.from_config(config))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, height, width)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``x`` (B, C, H, W), ``t`` (B,) or a scalar: (B, C_out, H, W)."""
        return self.unet(x, _batch_timesteps(t, len(x), x.device)).sample

    def spec(self) -> dict[str, Any]:
        """``{"name": "unet2d", "kwargs": {"config": ...}}`` for :func:`build_denoiser`."""
        config = {key: value for key, value in self.unet.config.items() if not key.startswith("_")}
        return {"name": "unet2d", "kwargs": {"config": config}}


def unet2d(
    sample_size: int,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
    **kwargs: Any,
) -> UNet2DDenoiser:
    """A small diffusers ``UNet2DModel`` (one resolution per entry of ``block_out_channels``, self-attention at
    the lowest resolution and in the middle block when ``attention``), wrapped as :class:`UNet2DDenoiser`.
    ``kwargs`` go to ``UNet2DModel`` (e.g. ``dropout``).

    Example:
        >>> import torch
        >>> net = unet2d(8, in_channels=1, block_out_channels=(8, 16))
        >>> net(torch.zeros(2, 1, 8, 8), torch.tensor([1, 500])).shape
        torch.Size([2, 1, 8, 8])
    """
    from diffusers import UNet2DModel

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
        **kwargs,
    )
    return UNet2DDenoiser(unet)


DENOISERS: dict[str, Callable[..., nn.Module]] = {"mlp": MLPDenoiser, "unet2d": UNet2DDenoiser.from_config}


def build_denoiser(spec: dict[str, Any]) -> nn.Module:
    """The denoiser described by ``spec`` (from a denoiser's ``spec()``), randomly initialised."""
    name = spec.get("name")
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; known: {sorted(DENOISERS)}")
    return DENOISERS[name](**spec.get("kwargs", {}))
