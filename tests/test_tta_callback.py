"""TestTimeAdaptation on LightningModules that know nothing of entreg: the callback does exactly what
a plain PyTorch loop with the same method does, and the module's own test_step sees the adapted model."""

from __future__ import annotations

import copy
import itertools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import TestTimeAdaptation
from entreg.modules import ClassificationModule
from entreg.tta import Tent, fisher_information
from tests.helpers import RecordingLogger, make_trainer


def cnn() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(8, 5))


class PlainClassifier(L.LightningModule):
    """A user's module: a network and a test step that logs accuracy."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen_weights: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.seen_weights.append(self.net[1].weight.detach().clone())
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def stream(n_batches: int = 4, batch_size: int = 8, shift: float = 1.5) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * batch_size, 3, 6, 6, generator=g) + shift
    y = torch.randint(0, 5, (n_batches * batch_size,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class LastLogits(L.Callback):
    def __init__(self, tta: TestTimeAdaptation) -> None:
        self.tta, self.logits = tta, []

    def on_test_batch_end(self, *args, **kwargs) -> None:
        self.logits.append(self.tta.last_logits)


def test_callback_equals_a_plain_loop_and_the_test_step_sees_the_adapted_model(tmp_path):
    model, plain_net = PlainClassifier(cnn()), cnn().eval()
    tta = TestTimeAdaptation("tent", num_classes=5, lr=0.05)
    logits, logger = LastLogits(tta), RecordingLogger()
    make_trainer(tmp_path, callbacks=[tta, logits], logger=logger).test(model, stream(), verbose=False)

    tent = Tent(plain_net, num_classes=5, lr=0.05)
    expected, weights = [], []
    for x, _ in stream():
        expected.append(tent.adapt(x)[0])
        weights.append(plain_net[1].weight.detach().clone())
    for got, want in zip(logits.logits, expected, strict=True):
        torch.testing.assert_close(got, want)
    for seen, want in zip(model.seen_weights, weights, strict=True):  # test_step ran after the update
        torch.testing.assert_close(seen, want)
    assert not torch.equal(weights[0], cnn()[1].weight)
    errors = [(e.argmax(1) != y).float().mean().item() for e, (_, y) in zip(expected, stream(), strict=True)]
    assert logger.values("tta/online_error") == pytest.approx(errors)
    assert logger.values("tta/selected") == [1.0] * 4 and len(logger.values("tta/entropy")) == 4


def test_predict_loop_adapts_too(tmp_path):
    model = PlainClassifier(cnn())
    tta = TestTimeAdaptation("tent", num_classes=5, lr=0.05, keep_adapted=True)
    predictions = make_trainer(tmp_path, callbacks=[tta]).predict(model, stream())
    assert len(predictions) == 4 and not torch.equal(model.net[1].weight, cnn()[1].weight)


def test_timm_model_with_sar_keeps_layer4_frozen(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=5, pretrained=False, norm_layer=lambda c, **_: nn.GroupNorm(2, c))
    before = copy.deepcopy(net.state_dict())

    class Wrapped(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def test_step(self, batch, batch_idx):
            return self.net(batch[0])

    tta = TestTimeAdaptation("sar", num_classes=5, module="net", margin=1.7, lr=0.05, keep_adapted=True)
    make_trainer(tmp_path, callbacks=[tta]).test(Wrapped(), stream(2, 4), verbose=False)
    changed = {k.rsplit(".", 1)[0] for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    norms = {name for name, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
    assert changed and changed <= norms and not any("layer4" in k for k in changed)


def test_nan_batch_is_skipped_and_leaves_the_model_untouched(tmp_path):
    loader = stream(3, 8)
    x, y = loader.dataset.tensors
    x[8] = float("nan")  # second batch
    model = PlainClassifier(cnn())
    with pytest.warns(UserWarning, match="batch 1 has NaN/Inf inputs"):
        make_trainer(tmp_path, callbacks=[TestTimeAdaptation("tent", num_classes=5, lr=0.05)]).test(
            model, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False
        )
    assert torch.equal(model.seen_weights[0], model.seen_weights[1])  # batch 1 did not move the weights
    assert not torch.equal(model.seen_weights[1], model.seen_weights[2]) and torch.isfinite(model.net[1].weight).all()


@pytest.mark.parametrize(("reset", "resets"), [("episodic", 3), ("per_dataloader", 1), ("continual", 0)])
def test_reset_modes(tmp_path, reset, resets):
    model = PlainClassifier(cnn())
    tta = TestTimeAdaptation("tent", num_classes=5, lr=0.05, reset=reset)
    loaders = [stream(2, 8, shift=1.0), stream(2, 8, shift=-1.0)]
    make_trainer(tmp_path, callbacks=[tta]).test(model, loaders, verbose=False)
    assert tta.method.resets == resets
    if reset == "episodic":  # every batch adapts from the source model: the last one too
        tent = Tent(cnn().eval(), num_classes=5, lr=0.05)
        tent.adapt(list(loaders[1])[-1][0])
        torch.testing.assert_close(model.seen_weights[3], tent.model[1].weight.detach())


def test_batch_size_one_on_batchnorm_warns(tmp_path):
    with pytest.warns(UserWarning, match="batch size 1 on a BatchNorm model"):
        make_trainer(tmp_path, callbacks=[TestTimeAdaptation("tent", num_classes=5)]).test(
            PlainClassifier(cnn()), stream(2, 1), verbose=False
        )


def test_num_classes_comes_from_hparams_or_from_the_logits(tmp_path):
    classifier = ClassificationModule("small_cnn", 5, 3, backbone_kwargs={"widths": (4, 8)})
    tta = TestTimeAdaptation("tent")
    make_trainer(tmp_path, callbacks=[tta]).test(classifier, stream(1, 8), verbose=False)
    assert tta.method.num_classes == 5
    # no hparams: read off the logits of the first batch, with the same updates as when it is given
    inferred, given = (
        TestTimeAdaptation("tent", lr=0.05),
        LastLogits(TestTimeAdaptation("tent", num_classes=5, lr=0.05)),
    )
    seen = LastLogits(inferred)
    make_trainer(tmp_path, callbacks=[inferred, seen]).test(PlainClassifier(cnn()), stream(), verbose=False)
    make_trainer(tmp_path, callbacks=[given.tta, given]).test(PlainClassifier(cnn()), stream(), verbose=False)
    assert inferred.method.num_classes == 5
    for a, b in zip(seen.logits, given.logits, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"expected logits of shape \(N, C >= 2\), got \(8, 5, 1\)"):
        net = nn.Sequential(cnn(), nn.Unflatten(1, (5, 1)))
        make_trainer(tmp_path, callbacks=[TestTimeAdaptation("tent")]).test(PlainClassifier(net), stream(1, 8))


class DictOutputClassifier(PlainClassifier):
    """A module whose network returns a dict (features and logits), as many real models do."""

    def forward(self, x):
        return {"logits": self.net(x), "features": self.net[:-1](x)}

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen_weights.append(self.net[1].weight.detach().clone())


def test_output_key_reads_the_logits_of_a_dict_output(tmp_path):
    tta = TestTimeAdaptation("tent", lr=0.05, output_key="logits")
    logits = LastLogits(tta)
    make_trainer(tmp_path, callbacks=[tta, logits]).test(DictOutputClassifier(cnn()), stream(), verbose=False)
    reference = LastLogits(TestTimeAdaptation("tent", num_classes=5, lr=0.05))
    make_trainer(tmp_path, callbacks=[reference.tta, reference]).test(PlainClassifier(cnn()), stream(), verbose=False)
    assert tta.method.num_classes == 5
    for a, b in zip(logits.logits, reference.logits, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match=r"expected a tensor, got dict \(set output_key"):
        make_trainer(tmp_path, callbacks=[TestTimeAdaptation("tent", num_classes=5)]).test(
            DictOutputClassifier(cnn()), stream(1, 8)
        )


def test_tent_on_a_batchnorm1d_mlp_through_the_callback(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    model = PlainClassifier(mlp)
    tta = TestTimeAdaptation("tent", lr=0.05, norm_types=["batchnorm1d"])
    make_trainer(tmp_path, callbacks=[tta]).test(model, stream(), verbose=False)
    adapted = {id(p) for p in tta.method.params}
    assert [n for n, p in model.net.named_parameters() if id(p) in adapted] == ["2.weight", "2.bias"]
    assert tta.method.num_classes == 5 and tta.last_info.selected == 8


class CleanData(L.LightningDataModule):
    def val_dataloader(self) -> DataLoader:
        return stream(3, 8, shift=0.0)

    def test_dataloader(self) -> DataLoader:
        return stream(2, 8)


def test_source_batches_feed_the_methods_prepare(tmp_path):
    tta = TestTimeAdaptation("eata", num_classes=5, source_batches=2, e_margin=5.0)
    model = PlainClassifier(cnn())
    make_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=CleanData(), verbose=False)
    net = cnn()
    clean = [x for x, _ in itertools.islice(CleanData().val_dataloader(), 2)]
    expected = fisher_information(Tent(net, num_classes=5).model, clean)
    assert set(tta.method.fishers) == {"net.1.weight", "net.1.bias"}
    torch.testing.assert_close(tta.method.fishers["net.1.weight"][0], expected["1.weight"][0])
    with pytest.raises(ValueError, match=r"source_batches: 'tent' uses no source data \(methods that do: \['eata'\]\)"):
        TestTimeAdaptation("tent", source_batches=2)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="unknown test-time adaptation method"):
        TestTimeAdaptation("tnet")
    with pytest.raises(ValueError, match="reset must be one of"):
        TestTimeAdaptation("tent", reset="sometimes")
    with pytest.raises(TypeError, match="unexpected argument 'plpd_threshold'"):
        TestTimeAdaptation("sar", plpd_threshold=0.2)


def test_batch_size_one_on_groupnorm_adapts_without_warning(tmp_path, recwarn):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = PlainClassifier(nn.Sequential(*layers, nn.Linear(8, 5)))
    before = model.net[1].weight.detach().clone()
    tta = TestTimeAdaptation("sar", num_classes=5, margin=10.0, lr=0.05, keep_adapted=True)
    make_trainer(tmp_path, callbacks=[tta]).test(model, stream(3, 1), verbose=False)
    assert not any("BatchNorm" in str(w.message) for w in recwarn)
    assert tta.batches == 3 and not torch.equal(model.net[1].weight, before)
