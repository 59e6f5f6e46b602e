"""The benchmark path (a protocol's stream through TestTimeAdaptation, the table) gives what a plain PyTorch loop of
the same method over the same stream gives; the source and BN-adapt rows are methods like the others; the table
is written as CSV and JSON; the lr scaling rules of the references are method options."""

from __future__ import annotations

import copy
import csv
import json
from typing import NamedTuple

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.callbacks.tta_benchmark import run_benchmark
from entreg.tta import build_method
from entreg.tta.benchmark import BenchmarkTable, OnlineStats, auroc
from entreg.tta.lr_scaling import lr_factor
from entreg.tta.protocols import Stream, protocol

CLASSES = 4


class Domain(NamedTuple):
    name: str
    dataset: Dataset
    corruption: str | None
    severity: int | None


PATTERNS = torch.randn(CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(5))


def images(n: int, seed: int, noise: float = 0.5, offset: float = 0.0) -> TensorDataset:
    """Class patterns plus noise (labels learnable), shifted by ``noise`` and ``offset``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(PATTERNS[y] + noise * torch.randn(n, 3, 6, 6, generator=g) + offset, y)


def net(norm: str = "batch") -> nn.Module:
    """A small CNN trained for a few steps on clean images (its running statistics those of clean data)."""
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, CLASSES))  # fmt: skip
    x, y = images(128, seed=100).tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def domains(n: int = 45) -> list[Domain]:
    shifts = {"noise": (1.5, 0.0), "offset": (0.5, 1.0), "both": (1.2, -0.8)}
    return [Domain(name, images(n, k, *shift), name, 5) for k, (name, shift) in enumerate(shifts.items())]


def trainer(callbacks: list, log: bool) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)  # fmt: skip


def plain_loop(model: nn.Module, stream: Stream, method: str, source: torch.Tensor | None = None, seed: int = 0,
               **kwargs) -> dict[str, float]:  # fmt: skip
    """The reference: the method on a copy of the model, batch after batch, reset as the protocol says."""
    tta = build_method(method, copy.deepcopy(model), CLASSES, **kwargs)
    if source is not None:
        tta.prepare(list(source.split(10)))
    torch.manual_seed(seed)
    errors = {}
    for k, segment in enumerate(stream.segments):
        if k and stream.reset == "per_dataloader":
            tta.reset()
        x, y = (t[segment.indices] for t in segment.dataset.tensors)
        batches = zip(x.split(16), y.split(16), strict=True)
        wrong = sum(int((tta.adapt(xb)[0].argmax(1) != yb).sum()) for xb, yb in batches)
        errors[segment.name] = wrong / len(y)
    return errors


ROWS = {
    "source": ("source", {}),
    "bn_adapt": ("bn_adapt", {}),
    "tent": ("tent", {"lr": 0.05}),
    "eata": ("eata", {"lr": 0.05, "e_margin": 1.0, "d_margin": 0.9, "fisher_alpha": 50.0}),
    "sar": ("sar", {"lr": 0.05, "margin": 1.0}),
    "deyo": ("deyo", {"lr": 0.05, "margin": 1.2, "plpd_threshold": -0.5}),
    "ostta": ("ostta", {"lr": 0.05}),
}


@pytest.mark.parametrize(("name", "labels"), [("continual", list(ROWS)), ("mild", ["bn_adapt", "eata", "sar"])])
def test_the_benchmark_rows_equal_a_plain_loop_of_the_same_method_over_the_same_stream(name, labels):
    model, stream = net(), protocol(name, shuffle=True).build(domains(), batch_size=16, seed=1)
    clean = images(30, seed=9)
    source = clean.tensors[0]

    def callback(method: str, kwargs: dict):
        batches = {"source_batches": 3} if method == "eata" else {}
        return lambda: TestTimeAdaptation(method, num_classes=CLASSES, **batches, **kwargs)

    rows = {label: callback(*ROWS[label]) for label in labels}
    table = run_benchmark(model, stream, rows, trainer, source=clean, seed=7, source_batch_size=10)
    for label in labels:
        method, kwargs = ROWS[label]
        expected = plain_loop(model, stream, method, source if method == "eata" else None, seed=7, **kwargs)
        got = dict(zip(stream.names, table.errors(label), strict=True))
        assert got == pytest.approx(expected, abs=1e-12), label
        assert table.extra[label]["images_per_second"] > 0
    assert len({tuple(table.errors(label)) for label in labels}) >= len(labels) - 1  # rows differ: the test has teeth
    assert table.rows["bn_adapt"]["noise"]["selected"] is None and 0 < table.rows["sar"]["noise"]["selected"] < 1
    for parameter, reference in zip(model.parameters(), net().parameters(), strict=True):
        assert torch.equal(parameter, reference)  # the caller's model is left as it was


def test_clean_error_after_the_stream_measures_the_adapted_model():
    model, stream = net(), protocol("continual").build(domains(), batch_size=16)
    clean = protocol("mild").build([domains()[0]], batch_size=16).segments[0]
    rows = {"bn_adapt": lambda: TestTimeAdaptation("bn_adapt", num_classes=CLASSES),
            "tent": lambda: TestTimeAdaptation("tent", num_classes=CLASSES, lr=0.5)}  # fmt: skip
    table = run_benchmark(model, stream, rows, trainer, after={"clean": clean})
    bn_after = table.extra["bn_adapt"]["after"]["clean"]
    assert bn_after == pytest.approx(table.rows["bn_adapt"]["noise"])  # no update: as on the stream
    assert table.extra["tent"]["after"]["clean"]["error"] != bn_after["error"]
    assert table.rows["tent"]["noise"]["mean_loss"] > 0 and bn_after["mean_loss"] is None


def test_online_stats_count_the_open_set_apart():
    stats = OnlineStats()
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.2, 0.0], [0.0, 0.1]])
    from entreg.tta import StepInfo

    info = StepInfo(2, 4, 0.1, mask=torch.tensor([True, True, False, True]))
    stats.update(logits, torch.tensor([0, 0, 5, -1]), info)
    result = stats.result()
    assert result["error"] == 0.5 and result["samples"] == 4 and result["selected"] == 0.75
    assert result["selected_known"] == 1.0 and result["selected_unknown"] == 0.5
    msp = logits.softmax(1).amax(1)
    assert result["msp_auroc"] == auroc(msp[:2], msp[2:]) == 1.0
    assert auroc(torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.1])) == 0.625  # a tie counts half
    merged = OnlineStats()
    merged.load_vector(stats.vector() * 2)
    assert merged.sums["samples"] == 8 and merged.predictions.tolist() == [4, 4]


def test_the_table_is_written_as_csv_and_json(tmp_path):
    table = BenchmarkTable(["gaussian_noise", "fog"], info={"protocol": "continual"})
    table.add("source", {"gaussian_noise": {"error": 0.5}, "fog": {"error": 0.25}}, images_per_second=10.0)
    table.add("tent", {"gaussian_noise": {"error": 0.25}, "fog": {"error": 0.125}}, images_per_second=5.0)
    paths = table.write(tmp_path)
    rows = list(csv.reader(paths["csv"].open()))
    assert rows == [["method", "gaussian_noise", "fog", "mean"], ["source", "50.00", "25.00", "37.50"],
                    ["tent", "25.00", "12.50", "18.75"]]  # fmt: skip
    written = json.loads(paths["json"].read_text())
    assert written["error_percent"]["tent"]["mean"] == 18.75 and written["extra"]["source"]["images_per_second"] == 10
    assert table.scalars()["benchmark/tent/fog/error"] == 0.125 and "source/mean_error" in table.scalars("")
    assert table.format().splitlines()[2].split() == ["source", "|", "50.0", "|", "25.0", "|", "37.5"]
    with pytest.raises(ValueError, match="row 'x' has segments"):
        table.add("x", {"fog": {"error": 0.1}})


def test_lr_scaling_rules_are_method_options_kept_through_reset():
    assert lr_factor("linear", 16, 64) == 0.25 and lr_factor("sar", 16, 64) == 0.5 and lr_factor("sar", 48, 64) == 1
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        build_method("tent", net(), CLASSES, lr_scaling="sqrt")
    x = torch.randn(16, 3, 6, 6)
    scaled = build_method("sar", net("group"), CLASSES, lr=0.1, lr_scaling="sar", reference_batch_size=64)
    plain = build_method("sar", net("group"), CLASSES, lr=0.1 * 2 * 16 / 64)
    for _ in range(2):
        torch.testing.assert_close(scaled.adapt(x)[0], plain.adapt(x)[0])
    scaled.reset()
    assert scaled.optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and scaled.lr_factor == 0.5
    linear = build_method("tent", net(), CLASSES, lr=0.1, lr_scaling="linear", reference_batch_size=8)
    linear.adapt(x)
    assert linear.optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_bn_adapt_and_source_are_methods_that_never_update():
    model = net()
    bn, source = build_method("bn_adapt", copy.deepcopy(model), CLASSES), build_method("source", model, CLASSES)
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        expected_source = model(x)
    logits, info = source.adapt(x)
    assert torch.equal(logits, expected_source) and info.loss is None and not source.updates
    bn_logits, _ = bn.adapt(x)
    assert not torch.allclose(bn_logits, expected_source) and bn.model[1].running_mean is None
    bn.reset()
    bn.restore()
    assert torch.equal(bn.model[1].running_mean, model[1].running_mean)
    with pytest.raises(RuntimeError, match="restore"):
        bn.adapt(x)
