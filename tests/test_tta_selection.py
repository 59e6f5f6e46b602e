"""Sample selection that stops adapting (issue 17, item 4): EATA's redundancy threshold follows the number
of classes as the references' configs set it, and any selecting method warns, once per streak, when it
selects no sample in several consecutive batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from entreg.tta import EATA, ETA, SAR, DeYO
from entreg.tta.base import NO_SELECTION_PATIENCE
from entreg.tta.eata import d_margin_for
from entreg.tta.recap import ReCAP


def prototype_net(scale: float = 3.0) -> tuple[nn.Module, torch.Tensor]:
    """A 10-class classifier without training: class c scores the correlation with a prototype image c."""
    torch.manual_seed(0)
    prototypes = torch.randn(10, 3, 8, 8)
    conv, head = nn.Conv2d(3, 10, 8, bias=False), nn.Linear(10, 10)
    with torch.no_grad():
        conv.weight.copy_(prototypes)
        head.weight.copy_(scale * torch.eye(10))
        head.bias.zero_()
    return nn.Sequential(conv, nn.BatchNorm2d(10), nn.Flatten(), head), prototypes


def stream(prototypes: torch.Tensor, n_batches: int = 8, size: int = 64, noise: float = 6.0) -> list[torch.Tensor]:
    """Noisy prototypes of all 10 classes: confident, diverse predictions (about 70% correct)."""
    g = torch.Generator().manual_seed(2)
    labels = [torch.randint(0, 10, (size,), generator=g) for _ in range(n_batches)]
    return [prototypes[y] + noise * torch.randn(size, 3, 8, 8, generator=g) for y in labels]


def run(method, batches: list[torch.Tensor]) -> tuple[list[int], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selected = [method.adapt(x)[1].selected for x in batches]
    return selected, [str(w.message) for w in caught if "consecutive batches" in str(w.message)]


@pytest.mark.parametrize("cls", [EATA, ETA])
def test_default_d_margin_follows_the_number_of_classes(cls):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert [cls(net, num_classes=c).d_margin for c in (2, 10, 99, 100, 126, 199, 200, 1000)] == [
        0.4, 0.4, 0.4, 0.1, 0.1, 0.1, 0.05, 0.05
    ]  # fmt: skip
    assert [d_margin_for(c) for c in (10, 100, 1000)] == [0.4, 0.1, 0.05]
    assert cls(net, num_classes=10, d_margin=0.05).d_margin == 0.05  # an explicit value wins
    with pytest.raises(ValueError, match=r"d_margin must be >= 0 \(None: by the number of classes\), got -0.1"):
        cls(net, num_classes=10, d_margin=-0.1)


def test_eata_keeps_adapting_on_10_classes_by_default_and_imagenets_margin_warns_once():
    net, prototypes = prototype_net()
    selected, warned = run(EATA(net, num_classes=10), stream(prototypes))
    assert selected[0] > 32 and min(selected[1:]) > 10 and warned == []  # 45, then 27-40 of 64

    net, prototypes = prototype_net()
    selected, warned = run(EATA(net, num_classes=10, d_margin=0.05), stream(prototypes))
    assert selected[0] > 32 and selected[1:] == [0] * 7  # ImageNet's 0.05: nothing after the first batch
    assert len(warned) == 1  # once for the streak, not on every later batch
    assert f"EATA selected no sample in {NO_SELECTION_PATIENCE} consecutive batches" in warned[0]
    assert "e_margin=0.921, d_margin=0.05" in warned[0] and "num_classes=10" in warned[0]


@pytest.mark.parametrize(
    ("cls", "arg", "kwargs"),
    [
        (EATA, "e_margin", {}),
        (ETA, "e_margin", {}),
        (SAR, "margin", {}),
        (DeYO, "margin", {"plpd_threshold": -1.0}),
        (ReCAP, "margin", {"head": "3"}),
    ],
)
def test_every_selecting_method_warns_once_per_streak_of_empty_batches(cls, arg, kwargs):
    net, prototypes = prototype_net()
    batches = stream(prototypes, n_batches=9, size=16)
    method = cls(net, num_classes=10, **{arg: 1e-6}, **kwargs)
    selected, warned = run(method, batches)
    assert selected == [0] * 9 and len(warned) == 1
    assert (
        warned[0].startswith(f"{cls.__name__} selected no sample in 5 consecutive batches") and f"{arg}=" in warned[0]
    )
    setattr(method, arg, 100.0)  # a batch that selects ends the streak
    assert run(method, batches[:1])[0][0] > 0
    setattr(method, arg, 1e-6)
    _, warned = run(method, batches[:5])
    assert len(warned) == 1  # a new streak warns again
