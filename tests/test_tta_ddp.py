"""TestTimeAdaptation under DDP (2 CPU processes, ddp_fork): the ranks sum their gradients and counts,
so a 2-process run equals one process on the global batch; no collective can deadlock."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import entreg.tta
from entreg.callbacks import TestTimeAdaptation
from entreg.tta import ETA, OSTTA, Tent
from entreg.tta.norm import ALL_NORMS
from tests.helpers import RankInterleaved, make_trainer

WORLD, RANK_BATCH = 2, 8


class TentGN(Tent):  # the Tent-family methods adapt BatchNorm only; on GroupNorm DDP can be exact
    name = "tent_gn"
    norm_types = ALL_NORMS


class ETAGN(ETA):
    name = "eta_gn"
    norm_types = ALL_NORMS


class OSTTAGN(OSTTA):
    name = "ostta_gn"
    norm_types = ALL_NORMS


@pytest.fixture(autouse=True)
def gn_variants(monkeypatch):
    for cls in (TentGN, ETAGN, OSTTAGN):
        monkeypatch.setitem(entreg.tta.METHODS, cls.name, cls)


def gn_net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers, nn.Linear(8, 5))
    with torch.no_grad():
        net[-1].weight.mul_(3.0)  # confident enough that entropy filters keep part of each batch
    return net.double()


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = gn_net()

    def test_step(self, batch, batch_idx):
        return self.net(batch[0])

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])


def data(nan_sample: int | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 6, 6, generator=g, dtype=torch.float64) + 1.0
    if nan_sample is not None:
        x[nan_sample] = float("nan")
    return TensorDataset(x, torch.randint(0, 5, (32,), generator=g))


class Record(L.Callback):
    def __init__(self, tta: TestTimeAdaptation) -> None:
        self.tta, self.logits = tta, []

    def on_test_batch_end(self, *args, **kwargs) -> None:
        self.logits.append(None if self.tta.last_logits is None else self.tta.last_logits.clone())


class ExpectOneProcess(L.Callback):
    """On each worker: its pre-update logits are its rows of the one-process logits, and the
    adapted weights equal the one-process weights."""

    def __init__(self, record: Record, logits: list, weights: dict[str, torch.Tensor]) -> None:
        self.record, self.logits, self.weights = record, logits, weights

    def on_test_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        for got, want in zip(self.record.logits, self.logits, strict=True):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want[rank::WORLD], rtol=0, atol=1e-10)
        for name, value in pl_module.net.state_dict().items():
            torch.testing.assert_close(value, self.weights[name], rtol=0, atol=1e-10, msg=name)


def one_process(method: str, kwargs: dict, dataset: TensorDataset) -> tuple[list, dict]:
    tta = TestTimeAdaptation(method, num_classes=5, module="net", keep_adapted=True, **kwargs)
    model = Classifier()
    record = Record(tta)
    make_trainer(None, callbacks=[tta, record]).test(model, DataLoader(dataset, batch_size=RANK_BATCH * WORLD))
    return record.logits, {k: v.clone() for k, v in model.net.state_dict().items()}


def two_processes(method: str, kwargs: dict, dataset: TensorDataset, extra: list) -> None:
    tta = TestTimeAdaptation(method, num_classes=5, module="net", **kwargs)
    record = Record(tta)
    loader = DataLoader(dataset, batch_size=RANK_BATCH, sampler=RankInterleaved(len(dataset)))
    trainer = make_trainer(None, devices=WORLD, strategy="ddp_fork", use_distributed_sampler=False,
                           callbacks=[tta, record, *[cb(record) for cb in extra]])  # fmt: skip
    trainer.test(Classifier(), loader, verbose=False)


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("tent_gn", {"lr": 0.05}),
        ("eta_gn", {"lr": 0.05, "e_margin": 1.515, "d_margin": 0.99}),
        ("sar", {"lr": 0.05, "margin": 1.515}),
        ("ostta_gn", {"lr": 0.05, "alpha": 1.0}),
    ],
)
def test_two_processes_equal_one_process_on_the_global_batch(method, kwargs):
    logits, weights = one_process(method, kwargs, data())
    assert not torch.equal(weights["1.weight"], gn_net().state_dict()["1.weight"])
    two_processes(method, kwargs, data(), [lambda record: ExpectOneProcess(record, logits, weights)])


def test_a_nan_batch_on_one_rank_is_skipped_on_all_ranks():
    # sample 17 sits in global batch 1, on rank 1 only: both ranks skip that batch
    logits, weights = one_process("tent_gn", {"lr": 0.05}, data(nan_sample=17))
    assert logits[1] is None and logits[0] is not None
    expect = [lambda record: ExpectOneProcess(record, logits, weights)]
    two_processes("tent_gn", {"lr": 0.05}, data(nan_sample=17), expect)


class RanksAgree(L.Callback):
    def __init__(self, record) -> None:
        pass

    def on_test_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
        assert not torch.equal(flat, torch.cat([p.flatten() for p in gn_net().parameters()]))


def test_deyo_ranks_stay_identical():
    """DeYO shuffles patches with each rank's own random numbers, so it cannot equal one process,
    but the ranks apply the same summed update."""
    two_processes("deyo", {"lr": 0.05, "margin": 1.515, "plpd_threshold": -1.0}, data(), [RanksAgree])


class Uneven(torch.utils.data.Sampler):
    def __iter__(self):
        rank = torch.distributed.get_rank()
        return iter(range(16 if rank == 0 else 8))

    def __len__(self) -> int:
        return 16 if torch.distributed.get_rank() == 0 else 8


def test_unequal_batch_counts_fail_clearly_instead_of_hanging():
    tta = TestTimeAdaptation("tent_gn", num_classes=5, module="net")
    trainer = make_trainer(None, devices=WORLD, strategy="ddp_fork", use_distributed_sampler=False, callbacks=[tta])
    with pytest.raises(Exception, match="same number of predict batches on every rank"):
        trainer.predict(Classifier(), DataLoader(data(), batch_size=4, sampler=Uneven()))
