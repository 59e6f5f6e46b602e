"""Multilayer perceptrons: linear layers with an activation (a timm name or class) between them.

Example:
    >>> net = mlp(3, (8, 8), 2, act_layer="tanh")
    >>> [type(layer).__name__ for layer in net]
    ['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from torch import nn

__all__ = ["mlp", "resolve_act_layer"]


def resolve_act_layer(act_layer: str | type[nn.Module]) -> type[nn.Module]:
    """The activation class for a name of timm's registry (``get_act_layer``: ``"relu"``, ``"tanh"``, ``"elu"``,
    ``"gelu"``, ``"silu"``...) or the class itself; an unknown name raises ``ValueError``.

    Example:
        >>> resolve_act_layer("relu")
        <class 'torch.nn.modules.activation.ReLU'>
    """
    from timm.layers import get_act_layer

    try:
        layer = get_act_layer(act_layer)
    except KeyError:
        layer = None
    if layer is None:
        raise ValueError(f"activation {act_layer!r} is not a name of timm's get_act_layer (e.g. 'relu', 'tanh')")
    return layer


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    act_layer: str | type[nn.Module] = "relu",
    output_gain: float | None = None,
) -> nn.Sequential:
    """Linear layers of widths ``in_dim, *hidden, out_dim`` with ``act_layer`` between them (none after the last).

    Args:
        in_dim, hidden, out_dim: the widths.
        act_layer: see :func:`resolve_act_layer`.
        output_gain: None keeps PyTorch's default initialisation (Stable-Baselines3's SAC); a number gives the
            orthogonal initialisation of OpenAI Baselines and SB3's PPO: gain sqrt(2) for the hidden layers,
            ``output_gain`` for the last one, zero biases (applied after all layers are built).

    Example:
        >>> net = mlp(4, (16,), 1, output_gain=1.0)
        >>> float(net[-1].bias.abs().sum()), tuple(net[0].weight.shape)
        (0.0, (16, 4))
    """
    act = resolve_act_layer(act_layer)
    dims = (in_dim, *hidden)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(dims[-1], out_dim))
    if output_gain is not None:
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        for i, linear in enumerate(linears):
            nn.init.orthogonal_(linear.weight, gain=output_gain if i == len(linears) - 1 else math.sqrt(2))
            nn.init.zeros_(linear.bias)
    return nn.Sequential(*layers)
