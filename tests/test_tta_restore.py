"""After adaptation the model is given back as it came (issue 17, item 3): BatchNorm running buffers
and flags, every parameter's requires_grad, the train/eval flags and the source weights (or the
adapted ones with keep_adapted), by a bare method's ``restore`` and by the callback at the end of a
test/predict run, also one that fails."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.tta import SAR, Tent
from tests.helpers import make_trainer


def cnn() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1)]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():  # source statistics that differ from a fresh layer's
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].num_batches_tracked.fill_(7)
    return net


def batches(n: int = 3, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 6, 6, generator=g) + 1.5 for _ in range(n)]


def loader(n: int = 3, size: int = 8) -> DataLoader:
    x = torch.cat(batches(n, size))
    return DataLoader(
        TensorDataset(x, torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(2))), size
    )


class Classifier(L.LightningModule):
    """A user's module that trains, tests and predicts."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = cnn()
        self.fail_at = fail_at
        self.adapted: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def test_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("test step failed")
        self.adapted = {k: v.clone() for k, v in self.state_dict().items()}  # what the last step saw
        return self(batch[0])

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    return state, grads, modes


def assert_restored(model: nn.Module, before: tuple[dict, dict, dict], weights: bool = True) -> None:
    state, grads, modes = before
    assert list(model.state_dict()) == list(state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: m.training for n, m in model.named_modules()} == modes
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.track_running_stats for m in bns)
    for key, value in model.state_dict().items():
        if weights or "running" in key or "num_batches" in key:
            assert torch.equal(value, state[key]), key
    copy.deepcopy(model).load_state_dict(state)  # strict: the saved checkpoint loads


def test_a_bare_method_restores_the_model():
    net = cnn()
    net.eval()
    net[0].bias.requires_grad_(False)  # frozen by the user: stays frozen
    before = snapshot(net)
    sar = SAR(net, num_classes=5, margin=5.0, lr=0.1)
    assert "1.running_mean" not in net.state_dict()
    net.train()  # e.g. to adapt with dropout on, as the references' model.train()
    for x in batches():
        sar.adapt(x)
    assert not torch.equal(net[1].weight, before[0]["1.weight"])
    sar.restore()  # back to eval, the mode it was built in
    assert_restored(net, before)
    sar.restore()  # a second call does nothing
    with pytest.raises(RuntimeError, match=r"SAR.adapt: restore\(\) has undone the configuration"):
        sar.adapt(batches(1)[0])


def test_a_model_without_the_method_s_norm_layers_is_left_as_it_came():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    net(torch.randn(2, 3, 4, 4))
    before = snapshot(net)
    with pytest.raises(ValueError, match="none found"):
        Tent(net, num_classes=5, norm_types=["layernorm"])
    assert_restored(net, before)


def test_keep_adapted_keeps_the_adapted_affine_weights_and_the_source_statistics():
    net = cnn()
    before = snapshot(net)
    tent = Tent(net, num_classes=5, lr=0.1)
    for x in batches():
        tent.adapt(x)
    adapted = {k: v.clone() for k, v in net.state_dict().items()}
    tent.restore(keep_adapted=True)
    assert_restored(net, before, weights=False)
    for key in ("1.weight", "1.bias"):
        assert torch.equal(net.state_dict()[key], adapted[key]) and not torch.equal(adapted[key], before[0][key])
    assert torch.equal(net[0].weight, before[0]["0.weight"])  # never adapted


def test_the_callback_gives_the_model_back_and_a_later_fit_trains_every_parameter(tmp_path):
    model = Classifier()
    before = snapshot(model)
    make_trainer(tmp_path, callbacks=[TestTimeAdaptation("tent", num_classes=5, lr=0.1)]).test(model, loader())
    assert not torch.equal(model.adapted["net.1.weight"], before[0]["net.1.weight"])  # it did adapt
    assert_restored(model, before)
    make_trainer(tmp_path, max_steps=2).fit(model, loader())
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[0][n])]
    assert unchanged == []
    assert not torch.equal(model.net[1].running_mean, before[0]["net.1.running_mean"])  # BN tracks again


def test_the_callback_keeps_the_adapted_weights_when_asked(tmp_path):
    model = Classifier()
    before = snapshot(model)
    tta = TestTimeAdaptation("tent", num_classes=5, lr=0.1, keep_adapted=True)
    assert "keep_adapted=True" in repr(tta)
    make_trainer(tmp_path, callbacks=[tta]).test(model, loader())
    assert_restored(model, before, weights=False)
    for key in ("net.1.weight", "net.1.bias"):
        assert torch.equal(model.state_dict()[key], model.adapted[key])
    with pytest.raises(TypeError, match="keep_adapted must be True or False"):
        TestTimeAdaptation("tent", keep_adapted="yes")


def test_the_callback_restores_after_a_failed_run_and_after_predict(tmp_path):
    model = Classifier(fail_at=1)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="test step failed"):
        make_trainer(tmp_path, callbacks=[TestTimeAdaptation("tent", num_classes=5, lr=0.1)]).test(model, loader())
    assert_restored(model, before)  # train mode too, which Lightning leaves at eval after an exception

    model = Classifier()
    before = snapshot(model)
    make_trainer(tmp_path, callbacks=[TestTimeAdaptation("sar", num_classes=5, lr=0.1)]).predict(model, loader())
    assert_restored(model, before)


class ExpectRestored(L.Callback):
    """On each DDP worker, after the adaptation callback's teardown: the model is the source model again."""

    def __init__(self, before: tuple[dict, dict, dict]) -> None:
        self.before = before

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        assert trainer.world_size == 2
        assert_restored(pl_module, self.before)


def test_every_ddp_rank_restores_its_model():
    model = Classifier()
    tta = TestTimeAdaptation("tent", num_classes=5, lr=0.1)
    trainer = make_trainer(None, devices=2, strategy="ddp_fork", callbacks=[tta, ExpectRestored(snapshot(model))])
    trainer.test(model, loader(4), verbose=False)  # the workers' assertions fail the test
