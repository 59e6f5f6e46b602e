"""Sliced Wasserstein and Frechet distances against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from entreg.diffusion.metrics import frechet_distance, sliced_wasserstein


def test_sliced_wasserstein_of_a_shift_is_its_length_over_sqrt_dim():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    shift = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)  # |c| = 5; E[(u.c)^2] = |c|^2 / D
    value = float(sliced_wasserstein(a + shift, a, 4096, g))
    assert value == pytest.approx(5 / math.sqrt(4), rel=0.03)
    assert float(sliced_wasserstein(a, a + shift, 4096, torch.Generator().manual_seed(1))) == pytest.approx(
        value, rel=0.03
    )
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(a, a[:10])


def test_frechet_distance_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(20000, 3, generator=g, dtype=torch.float64) + 1.0
    # N(0, I) vs N(1, 4 I): |1|^2 * 3 + tr(I + 4I - 2 * 2I) = 3 + 3 = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
