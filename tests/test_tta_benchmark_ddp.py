"""The benchmark path under DDP (2 CPU processes, ddp_fork): each rank reads its share of every global batch, no
sample twice and none dropped, and the run equals one process on the same global batches (GroupNorm: exact)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.callbacks.tta_benchmark import run_benchmark
from entreg.distributed import all_gather_uneven
from entreg.tta.protocols import protocol
from tests.test_tta_protocols import Domain

WORLD, CLASSES = 2, 5
SIZES = {"noise": 21, "fog": 18}  # last global batches of 5 and 2 (one of 1 would join the batch before: see
# test_tta_protocols.py; one process keeps it apart, so that stream would differ from one process's)


def gn_net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers, nn.Linear(8, CLASSES))
    with torch.no_grad():
        net[-1].weight.mul_(3.0)  # confident enough that the entropy filters keep part of each batch
    return net.double()


def domains() -> list[Domain]:
    out, start = [], 0
    for k, (name, n) in enumerate(SIZES.items()):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) + 1.0
        ids = torch.arange(start, start + n)
        out.append(Domain(name, TensorDataset(x, torch.randint(0, CLASSES, (n,), generator=g), ids), name, 5))
        start += n
    return out


class ById(L.Callback):
    """One process: the pre-update logits of every sample, by its id."""

    def __init__(self, tta: TestTimeAdaptation) -> None:
        self.tta, self.logits = tta, {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.logits |= dict(zip(batch[2].tolist(), self.tta.last_logits.clone(), strict=True))


class ExpectOneProcess(L.Callback):
    """On each worker: each batch holds this rank's share of the global batch (rows r, r + 2, ...), its logits are
    the one-process logits of those samples, and over the run the ranks read every sample exactly once."""

    def __init__(self, tta: TestTimeAdaptation, expected: dict[int, torch.Tensor]) -> None:
        self.tta, self.expected, self.seen = tta, expected, []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        ids = batch[2].tolist()
        assert ids == list(range(ids[0], ids[0] + WORLD * len(ids), WORLD))  # interleaved: samples r, r + 2, ...
        assert (ids[0] - (0 if ids[0] < 21 else 21)) % 8 == trainer.global_rank  # rank r starts at row r
        want = torch.stack([self.expected[i] for i in ids])
        torch.testing.assert_close(self.tta.last_logits, want, rtol=0, atol=1e-10)
        self.seen += ids

    def on_test_end(self, trainer, pl_module) -> None:
        seen = all_gather_uneven(trainer.strategy, torch.tensor(self.seen)).tolist()
        assert sorted(seen) == list(range(sum(SIZES.values())))  # no duplicate, no drop


def trainer(devices: int, extra=None):
    def make(callbacks: list, log: bool) -> L.Trainer:
        more = [] if extra is None else [extra(callbacks[0])]
        return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[*callbacks, *more])  # fmt: skip

    return make


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("tent", {"lr": 0.05, "norm_types": ["groupnorm"]}), ("sar", {"lr": 0.05, "margin": 1.515})],
)
def test_two_ranks_equal_one_rank_on_the_same_global_batches_without_duplicates_or_drops(method, kwargs):
    stream = protocol("continual").build(domains(), batch_size=8)
    records = []

    def record(tta):
        records.append(ById(tta))
        return records[-1]

    row = {method: lambda: TestTimeAdaptation(method, num_classes=CLASSES, **kwargs)}
    one = run_benchmark(gn_net(), stream, row, trainer(1, record))
    (expected,) = records
    assert len(expected.logits) == sum(SIZES.values())
    two = run_benchmark(gn_net(), stream, row, trainer(WORLD, lambda tta: ExpectOneProcess(tta, expected.logits)))
    for segment in SIZES:  # back in the main process: the same table
        assert two.rows[method][segment] == pytest.approx(one.rows[method][segment], abs=1e-9)
    assert one.rows[method]["noise"]["samples"] == 21 and 0 < one.rows[method]["fog"]["error"] < 1
