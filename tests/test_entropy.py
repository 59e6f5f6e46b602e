"""Properties of the entropy core: bounds, invariances, exact gradients, extreme and half inputs."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from hypothesis.extra.numpy import arrays

from entreg.entropy import (
    attention_entropy,
    categorical_entropy,
    gaussian_entropy,
    marginal_entropy,
    von_neumann_entropy,
)

finite = st.floats(-50, 50, allow_nan=False, width=64)
extreme = st.floats(-1e4, 1e4, allow_nan=False, width=64)


def logits_arrays(elements, max_classes: int = 40):
    shapes = st.tuples(st.integers(1, 6), st.integers(2, max_classes))
    return shapes.flatmap(lambda s: arrays("float64", s, elements=elements)).map(torch.from_numpy)


def naive_entropy(z: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z, -1)
    return -(p * torch.log(p)).sum(-1)


@given(logits_arrays(extreme))
def test_bounds_hold_on_any_finite_logits(z):
    h = categorical_entropy(z)
    assert torch.isfinite(h).all()
    assert (h >= 0).all()
    assert (h <= math.log(z.shape[-1]) + 1e-12).all()


@given(logits_arrays(finite), st.floats(-1e3, 1e3, allow_nan=False))
def test_invariant_to_a_constant_shift(z, shift):
    torch.testing.assert_close(categorical_entropy(z + shift), categorical_entropy(z), atol=1e-9, rtol=1e-9)


@given(logits_arrays(finite))
def test_matches_naive_formula_and_its_gradient(z):
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    weights = torch.linspace(0.5, 1.5, z.shape[0], dtype=z.dtype)
    h1, h2 = categorical_entropy(z1), naive_entropy(z2)
    torch.testing.assert_close(h1, h2, atol=1e-10, rtol=1e-10)
    (h1 * weights).sum().backward()
    (h2 * weights).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-10, rtol=1e-8)


def test_gradcheck_float64():
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(categorical_entropy, (z,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    z = (torch.randn(16, 1000) * 30).to(dtype).requires_grad_(True)
    h = categorical_entropy(z)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, categorical_entropy(z.detach().float()))
    h.sum().backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()


@given(logits_arrays(st.sampled_from([1e4, -1e4, 0.0, 65504.0, -65504.0])))
def test_no_nan_or_inf_on_extreme_logits_including_fp16(z):
    for x in (z, z.float(), z.half()):
        x = x.clone().requires_grad_(True)
        h = categorical_entropy(x)
        h.sum().backward()
        assert torch.isfinite(h).all() and torch.isfinite(x.grad).all()


def test_one_hot_is_zero_and_uniform_is_log_c():
    z = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    h = categorical_entropy(z)
    assert h[0].item() == 0.0 and math.copysign(1.0, h[0].item()) == 1.0  # +0, not -0
    assert h[1].item() == pytest.approx(math.log(3))


def test_masked_logits_are_ignored_and_nan_propagates():
    z = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    h = categorical_entropy(z)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2))
    assert z.grad[0, 2].item() == 0.0 and torch.isfinite(z.grad).all()
    assert torch.isnan(categorical_entropy(torch.tensor([[0.0, float("nan")]]))).all()


def test_dim_argument():
    z = torch.randn(4, 5, 6)
    torch.testing.assert_close(categorical_entropy(z, dim=1), naive_entropy(z.transpose(1, 2)))


def test_gaussian_entropy_matches_torch_distributions():
    log_std = torch.randn(5, 3)
    expected = torch.distributions.Normal(torch.zeros(5, 3), log_std.exp()).entropy().sum(-1)
    torch.testing.assert_close(gaussian_entropy(log_std), expected)
    torch.testing.assert_close(gaussian_entropy(log_std, dim=None).sum(-1), expected)


@given(logits_arrays(finite, max_classes=12))
def test_marginal_entropy_is_entropy_of_the_mean_prediction(z):
    expected = naive_entropy(torch.log(torch.softmax(z, -1).mean(0)))
    torch.testing.assert_close(marginal_entropy(z), expected, atol=1e-9, rtol=1e-9)
    # concavity: the entropy of the mean is at least the mean entropy
    assert marginal_entropy(z) >= categorical_entropy(z).mean() - 1e-9


def test_marginal_entropy_batch_dim():
    z = torch.randn(7, 3, 5)  # (batch, groups, classes) -> one marginal per group
    out = marginal_entropy(z.transpose(0, 1), batch_dim=1)
    torch.testing.assert_close(out, torch.stack([marginal_entropy(z[:, g]) for g in range(3)]))
    with pytest.raises(ValueError, match="must differ"):
        marginal_entropy(z, dim=0, batch_dim=0)


def test_von_neumann_entropy_against_the_eigendecomposition():
    h = torch.randn(50, 8, dtype=torch.float64)
    z = torch.nn.functional.normalize(h, dim=1)
    lam = torch.linalg.eigvalsh(z.T @ z / 50).clamp(min=0)
    expected = -(lam[lam > 0] * lam[lam > 0].log()).sum()
    torch.testing.assert_close(von_neumann_entropy(h), expected)
    # collapsed features (one direction) have zero entropy; isotropic ones reach log d
    assert von_neumann_entropy(torch.ones(10, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert von_neumann_entropy(torch.eye(4), normalize=True).item() == pytest.approx(1.0)


def test_von_neumann_entropy_has_finite_gradients_when_n_below_d():
    h = torch.randn(6, 32, requires_grad=True)
    von_neumann_entropy(h).backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_attention_entropy():
    attn = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    torch.testing.assert_close(attention_entropy(attn), naive_entropy(torch.log(attn)))
    assert attention_entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0


def test_second_derivatives_raise_instead_of_being_wrong():
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(categorical_entropy(z).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        grad.sum().backward()


def test_empty_class_dimension_is_an_error():
    with pytest.raises(ValueError, match="non-empty class dimension"):
        categorical_entropy(torch.zeros(3, 0))


def test_exact_zeros_give_finite_gradients():
    # causal attention: the upper triangle is exactly 0
    scores = torch.randn(4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf"))
    attn = torch.softmax(scores, -1).requires_grad_(True)
    attention_entropy(attn).sum().backward()
    assert torch.isfinite(attn.grad).all()
    # rank-deficient features: zero eigenvalues
    h = torch.cat([torch.eye(2, 16)] * 4).requires_grad_(True)
    von_neumann_entropy(h).backward()
    assert torch.isfinite(h.grad).all()
    assert von_neumann_entropy(h).item() == pytest.approx(math.log(2))
    # a class masked in every sample
    z = torch.randn(5, 3).index_fill(1, torch.tensor([2]), float("-inf")).requires_grad_(True)
    marginal_entropy(z).backward()
    assert torch.isfinite(z.grad).all() and (z.grad[:, 2] == 0).all()
