"""The MLP builder: timm's activation names, PyTorch's default initialisation or SB3's orthogonal one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from entreg.nn.mlp import mlp, resolve_act_layer


def test_layers_and_activations_by_timm_name_or_class():
    net = mlp(5, (7, 3), 2, act_layer="gelu")
    assert [type(m).__name__ for m in net] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(5, 7), (7, 3), (3, 2)]
    assert isinstance(mlp(2, (), 1, act_layer=nn.ELU)[0], nn.Linear) and resolve_act_layer(nn.ELU) is nn.ELU
    assert type(mlp(2, (4,), 1, act_layer=nn.ELU)[1]) is nn.ELU
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(4, (4,), 4, "tanh")[1](x), torch.tanh(x))
    for bad in ("nope", None):
        with pytest.raises(ValueError, match="activation"):
            mlp(2, (4,), 1, act_layer=bad)  # type: ignore[arg-type]


def test_default_initialisation_is_pytorchs_in_layer_order():
    torch.manual_seed(0)
    net = mlp(6, (16, 8), 3)
    torch.manual_seed(0)
    plain = [nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 3)]
    for ours, theirs in zip([m for m in net if isinstance(m, nn.Linear)], plain, strict=True):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_orthogonal_initialisation_with_the_output_gain():
    net = mlp(6, (16, 16), 2, output_gain=0.01)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for linear, gain in zip(linears, (math.sqrt(2), math.sqrt(2), 0.01), strict=True):
        w = linear.weight.detach()
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # orthogonal rows or columns, scaled by the gain
        torch.testing.assert_close(small, gain**2 * torch.eye(min(w.shape)), atol=1e-5, rtol=1e-5)
        assert not linear.bias.any()
