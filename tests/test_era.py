"""ERA: the per-sample entropy floor, class order, the Lambert W branch, validation, the Gaussian form."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from entreg.entropy import categorical_entropy, gaussian_entropy
from entreg.nn import ERA, GaussianERA, era_logits, era_target_range
from entreg.nn.era import lambert_wm1_neg


def _logit_batches(num_classes: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(num_classes)
    random = torch.randn(512, num_classes, generator=g, dtype=torch.float64) * 5
    near_one_hot = torch.full((num_classes, num_classes), -30.0, dtype=torch.float64).fill_diagonal_(30.0)
    extreme = torch.full((num_classes, num_classes), -1e4, dtype=torch.float64).fill_diagonal_(1e4)
    huge_random = torch.randn(256, num_classes, generator=g, dtype=torch.float64) * 1e4
    return [random, near_one_hot, extreme, huge_random, torch.zeros(1, num_classes, dtype=torch.float64)]


@pytest.mark.parametrize("lambert_w", ["approx", "exact"])
@pytest.mark.parametrize("num_classes", [2, 10, 1000])
@pytest.mark.parametrize("where", [0.001, 0.25, 0.5, 0.75, 1.0])
def test_entropy_floor_holds_for_every_sample(num_classes, where, lambert_w):
    low, high = era_target_range(num_classes)
    target = low + where * (high - low)
    for z in _logit_batches(num_classes):
        for dtype in (torch.float64, torch.float32):
            h = categorical_entropy(era_logits(z.to(dtype), target, lambert_w=lambert_w))
            assert torch.isfinite(h).all()
            assert (h >= target - 1e-6).all(), (h.min().item(), target)


@given(
    st.integers(2, 50),
    st.floats(0.0, 1.0),
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=50, max_size=50),
)
def test_entropy_floor_property(num_classes, where, values):
    low, high = era_target_range(num_classes)
    target = low + 1e-6 + where * (high - low - 1e-6)
    z = torch.tensor(values[:num_classes], dtype=torch.float64).unsqueeze(0)
    assert categorical_entropy(era_logits(z, target)).item() >= target - 1e-9


def test_class_order_is_preserved():
    z = torch.randn(64, 10, dtype=torch.float64) * 4
    assert torch.equal(era_logits(z, 0.6).argsort(-1), z.argsort(-1))
    # in float32, classes of negligible probability may tie, but never swap, and the top-1 is kept
    z32 = z.float() * 3
    out = era_logits(z32, 0.6)
    larger = z32.unsqueeze(-1) > z32.unsqueeze(-2)
    assert (out.unsqueeze(-1) >= out.unsqueeze(-2))[larger].all()
    assert torch.equal(out.argmax(-1), z32.argmax(-1))


def test_paper_defaults_cap_confidence_on_ten_classes():
    # H0 = 0.6 with tau = 4 on 10 classes caps the top probability near 0.79 (ERA, arXiv 2510.08549)
    top = torch.softmax(era_logits(torch.tensor([[1e4] + [0.0] * 9]), 0.6), -1).max().item()
    assert 0.75 < top < 0.82


@pytest.mark.parametrize("h", [1e-30, 1e-6, 0.01, 0.1, 0.3, math.log(4) / 4])
def test_exact_lambert_w_solves_the_equation_on_the_lower_branch(h):
    ht = torch.tensor([h], dtype=torch.float64)
    w = lambert_wm1_neg(ht, "exact")
    assert w.item() <= -1.0
    assert (w * w.exp()).item() == pytest.approx(-h, rel=1e-12, abs=1e-300)
    approx = lambert_wm1_neg(ht, "approx").item()
    u = -1 - math.log(h)
    assert -1 - math.sqrt(2 * u) - u <= w.item() <= -1 - math.sqrt(2 * u) - 2 * u / 3
    assert -1 - math.sqrt(2 * u) - u <= approx <= -1 - math.sqrt(2 * u) - 2 * u / 3


def test_exact_lambert_w_gradient():
    h = torch.tensor([1e-4, 0.05, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lambert_wm1_neg(x, "exact"), (h,))


def test_gradients_flow_and_are_finite_on_extreme_logits():
    z = (torch.randn(8, 10) * 1e4).requires_grad_(True)
    era_logits(z, 0.6).logsumexp(-1).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_half_precision_logits():
    z = (torch.randn(8, 10) * 100).half()
    out = era_logits(z, 0.6)
    assert out.dtype == torch.float32 and (categorical_entropy(out) >= 0.6).all()


def test_module_apply_at_eval_and_target_setter():
    z = torch.randn(4, 10) * 10
    era = ERA(10, target_entropy=0.6, apply_at_eval=False).eval()
    assert torch.equal(era(z), z)
    era.train()
    assert not torch.equal(era(z), z)
    era.target_entropy = 1.5
    assert (categorical_entropy(era(z)) >= 1.5).all()
    with pytest.raises(ValueError, match=r"valid range is \(-0.0597, 2.2429\]"):
        era.target_entropy = 3.0


def test_target_is_saved_in_the_state_dict():
    era = ERA(10, target_entropy=0.6)
    era.target_entropy = 1.1
    restored = ERA(10, target_entropy=0.6)
    restored.load_state_dict(era.state_dict())
    assert restored.target_entropy == 1.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 10, "target_entropy": 2.3}, r"valid range is \(-0.0597, 2.2429\]"),
        ({"num_classes": 10, "target_entropy": -0.1}, "out of range for 10 classes"),
        ({"num_classes": 1}, "at least 2 classes"),
        ({"num_classes": 10, "tau": 2.0}, "tau must be > e"),
        ({"num_classes": 10, "lambert_w": "newton"}, "'approx' or 'exact'"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ERA(**kwargs)


def test_wrong_number_of_classes_at_call():
    with pytest.raises(ValueError, match="built for 10 classes"):
        ERA(10)(torch.zeros(2, 5))


# ---- continuous ----


@given(st.integers(1, 12), st.floats(0.02, 1.0), st.floats(-50, 50))
def test_gaussian_entropy_equals_target_or_exceeds_it_only_by_the_clamp(action_dim, where, scale):
    era = GaussianERA(action_dim, log_std_min=-5.0, log_std_max=1.0)
    low, high = era.target_range()
    era.target_entropy = low + where * (high - low)
    scores = torch.randn(32, action_dim, dtype=torch.float64) * scale
    _, log_std = era(torch.zeros(32, action_dim), scores)
    h = gaussian_entropy(log_std)
    clamped = (log_std <= era.log_std_min + 1e-12).any(-1)
    assert (log_std <= era.log_std_max + 1e-9).all() and (log_std >= era.log_std_min).all()
    torch.testing.assert_close(h[~clamped], torch.full_like(h[~clamped], era.target_entropy))
    assert (h[clamped] >= era.target_entropy - 1e-9).all()


def test_gaussian_one_dimension_is_a_constant_std():
    era = GaussianERA(1, target_entropy=0.0)
    _, log_std = era(torch.zeros(5, 1), torch.randn(5, 1))
    torch.testing.assert_close(log_std, torch.full((5, 1), -0.5 * math.log(2 * math.pi * math.e)))


def test_gaussian_noise_goes_where_the_scores_point():
    era = GaussianERA(3, target_entropy=-3.0)
    _, log_std = era(torch.zeros(1, 3), torch.tensor([[5.0, 0.0, 0.0]]))
    # the budget is negative: the dimension with the largest score gets the smallest std
    assert log_std[0, 0] < log_std[0, 1] and torch.isclose(log_std[0, 1], log_std[0, 2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"action_dim": 2, "target_entropy": 5.0}, r"totals are \(-13.1621, 2.8379\], i\.e\. \(-6.5811, 1.4189\]"),
        ({"action_dim": 2, "target_entropy": -20.0}, r"-20.0 nats \(the total over action_dim=2: -10 per dimension\)"),
        ({"action_dim": 0}, "action_dim >= 1"),
        ({"action_dim": 2, "log_std_min": 1.0, "log_std_max": 0.0}, "must be < log_std_max"),
    ],
)
def test_gaussian_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianERA(**kwargs)


def test_per_dimension_targets_are_checked_and_reported_per_dimension():
    era = GaussianERA.per_dimension(3, 0.25)
    assert era.target_entropy == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"^era_entropy_per_dim=100 nats per action dimension is out of range .*"
                       r"valid \(-6.5811, 1.4189\] \(a target of 300 nats over 3 dimensions\)$"):  # fmt: skip
        GaussianERA.per_dimension(3, 100)
