"""EntropyMonitor and EntropyController on Lightning's own demo modules and on entreg's classifier,
checked against entropies computed by hand from the same outputs."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import EntropyController, EntropyMonitor
from entreg.entropy import von_neumann_entropy
from entreg.modules import ClassificationModule
from tests.helpers import OutputRecorder, RecordingLogger, entropy_by_hand, make_trainer


def random_loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(RandomDataset(32, n), batch_size=batch_size, generator=torch.Generator().manual_seed(seed))


def fit_with(model, tmp_path, callbacks, train=None, val=None, **trainer_kwargs):
    logger = RecordingLogger()
    recorder = OutputRecorder()
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[*callbacks, recorder], **trainer_kwargs)
    trainer.fit(model, train or random_loader(), val)
    return trainer, logger, recorder


# --- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_format": "log"}, "input_format"),
        ({"stages": ("train", "fit")}, "stages"),
        ({"stages": ()}, "stages"),
        ({"stages": ("val", "val")}, "stages"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attribute": ""}, "attribute"),
        ({"target": math.nan}, "target"),
        ({"kp": -1.0}, "kp"),
        ({"kp": 0.0, "ki": 0.0}, "not both 0"),
        ({"min_value": 1.0, "max_value": 1.0}, "max_value"),
        ({"initial": 5.0, "max_value": 1.0}, "initial"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"input_format": "entropy"}, "input_format"),
    ],
)
def test_controller_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyController(**{"attribute": "confidence_penalty.coef", "target": 1.0, **kwargs})


def test_unknown_submodule_fails_at_setup_with_close_names(tmp_path):
    with pytest.raises(AttributeError, match=r"no submodule 'layr'.*'layer'"):
        fit_with(BoringModel(), tmp_path, [EntropyMonitor(module="layr")], max_steps=1)
    with pytest.raises(AttributeError, match="no attribute 'learning_rte'"):
        fit_with(DemoModel(), tmp_path, [EntropyController("learning_rte", target=1.0)], max_steps=1)


def test_controller_bounds_are_checked_against_the_attribute(tmp_path):
    model = ClassificationModule("small_cnn", 4, 1, backbone_kwargs={"widths": (4, 8)}, output_activation="era")
    # ERA's target must lie in (1 + ln U, 1 + ln(D U)] = (-0.06, 1.33] for 4 classes and tau = 4
    controller = EntropyController("output_activation.target_entropy", target=1.0, min_value=0.0, max_value=1.5)
    with pytest.raises(ValueError, match=r"not valid values of 'output_activation\.target_entropy'"):
        controller.setup(make_trainer(tmp_path), model, "fit")
    assert model.output_activation.target_entropy == pytest.approx(0.6)  # left as it was


# --- EntropyMonitor on Lightning's demo modules -----------------------------------------------


def test_monitor_on_boring_model_matches_hand_computed_entropies(tmp_path):
    torch.manual_seed(0)
    _, logger, recorder = fit_with(
        BoringModel(), tmp_path, [EntropyMonitor()], val=random_loader(16, 4, seed=1), max_epochs=2
    )
    train, val = recorder.outputs["train"], recorder.outputs["val"]
    assert len(train) == 8 and len(val) == 8  # 4 batches x 2 epochs each
    step_values = logger.values("train/pred_entropy")
    expected = [entropy_by_hand(out).mean().item() for out in train]
    assert step_values == pytest.approx(expected, rel=1e-6)
    for epoch in range(2):
        h = torch.cat([entropy_by_hand(out) for out in val[4 * epoch : 4 * epoch + 4]])
        assert logger.values("val/pred_entropy_mean")[epoch] == pytest.approx(h.mean().item(), rel=1e-6)
        assert logger.values("val/pred_entropy_min")[epoch] == pytest.approx(h.min().item(), rel=1e-6)
        assert logger.values("val/pred_entropy_max")[epoch] == pytest.approx(h.max().item(), rel=1e-6)
        h = torch.cat([entropy_by_hand(out) for out in train[4 * epoch : 4 * epoch + 4]])
        assert logger.values("train/pred_entropy_mean")[epoch] == pytest.approx(h.mean().item(), rel=1e-6)


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, vocab: int, length: int = 6, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (size, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return self.tokens[i, :-1], self.tokens[i, 1:]


class _OfflineTransformer(LightningTransformer):
    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; the test brings its own tokens
        pass


def test_monitor_on_lightning_transformer_log_probs(tmp_path):
    """The transformer demo returns log-probabilities (N*T, V) from a model with dropout: the monitor
    must measure the very outputs of the step, not a second forward pass."""
    torch.manual_seed(0)
    model = _OfflineTransformer(vocab_size=20)
    _, logger, recorder = fit_with(
        model, tmp_path, [EntropyMonitor()], train=DataLoader(_TokenData(20), batch_size=4), max_steps=3
    )
    expected = [entropy_by_hand(out).mean().item() for out in recorder.outputs["train"]]
    assert len(expected) == 3
    assert logger.values("train/pred_entropy") == pytest.approx(expected, rel=1e-6)
    assert all(0 < h < math.log(20) for h in expected)


class _DictOutput(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(32, 3)
        self.unused = torch.nn.Linear(32, 3)

    def forward(self, x):
        return {"logits": self.head(x), "other": x}

    def step(self, batch):
        return self(batch)["logits"].square().mean()


def test_monitor_reads_a_key_of_a_dict_output_and_a_submodule(tmp_path):
    torch.manual_seed(0)
    key = EntropyMonitor(output_key="logits", stages=("train",))
    sub = EntropyMonitor(module="head", stages=("train",), name="head_entropy")
    _, logger, recorder = fit_with(_DictOutput(), tmp_path, [key, sub], max_steps=2)
    # the recorder hooks the root module: its outputs are dicts
    expected = [entropy_by_hand(out["logits"]).mean().item() for out in recorder.outputs["train"]]
    assert logger.values("train/pred_entropy") == pytest.approx(expected, rel=1e-6)
    assert logger.values("train/head_entropy") == pytest.approx(expected, rel=1e-6)


def test_monitor_without_key_on_dict_output_says_what_to_set(tmp_path):
    with pytest.raises(TypeError, match="set output_key"):
        fit_with(_DictOutput(), tmp_path, [EntropyMonitor()], max_steps=1)


def test_monitor_warns_when_its_module_is_never_called(tmp_path):
    with pytest.warns(UserWarning, match="'unused' was not called"):
        _, logger, _ = fit_with(_DictOutput(), tmp_path, [EntropyMonitor(module="unused")], max_steps=2)
    assert logger.values("train/pred_entropy") == []


class _AssertNoHooksInVal(BoringModel):
    def validation_step(self, batch, batch_idx):
        assert not self._forward_hooks and not self.layer._forward_hooks  # unmonitored: nothing attached
        return super().validation_step(batch, batch_idx)


def test_unmonitored_stage_has_no_hooks(tmp_path):
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[EntropyMonitor(stages=("train",))])
    trainer.fit(_AssertNoHooksInVal(), random_loader(), random_loader(8, 4))
    assert logger.values("train/pred_entropy_mean") and not logger.values("val/pred_entropy_mean")


def test_monitor_test_and_predict_stages(tmp_path):
    torch.manual_seed(0)
    model = BoringModel()
    logger, recorder = RecordingLogger(), OutputRecorder()
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[EntropyMonitor(stages=("test", "predict")), recorder])
    trainer.test(model, random_loader(16, 4), verbose=False)
    h = torch.cat([entropy_by_hand(out) for out in recorder.outputs["test"]])
    assert logger.values("test/pred_entropy_mean") == pytest.approx([h.mean().item()], rel=1e-6)
    predictions = trainer.predict(model, random_loader(16, 4))
    h = torch.cat([entropy_by_hand(p) for p in predictions])
    assert logger.values("predict/pred_entropy_mean") == pytest.approx([h.mean().item()], rel=1e-6)


def test_representation_entropy_is_the_vne_of_the_whole_epoch(tmp_path):
    torch.manual_seed(0)
    monitor = EntropyMonitor(features="layer", stages=("val",))
    _, logger, recorder = fit_with(BoringModel(), tmp_path, [monitor], val=random_loader(24, 8), limit_train_batches=1)
    # BoringModel's output is its layer's output: the VNE of all 24 validation feature vectors
    expected = von_neumann_entropy(torch.cat(recorder.outputs["val"]).double()).item()
    assert logger.values("val/repr_entropy") == pytest.approx([expected], rel=1e-6)


def test_nan_outputs_are_left_out_and_counted(tmp_path):
    x = torch.randn(16, 32)
    x[3] = float("nan")
    monitor = EntropyMonitor(stages=("test",))
    logger, recorder = RecordingLogger(), OutputRecorder()
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor, recorder])
    trainer.test(BoringModel(), DataLoader(x, batch_size=8), verbose=False)
    h = torch.cat([entropy_by_hand(out) for out in recorder.outputs["test"]])
    assert logger.values("test/pred_entropy_nonfinite") == [1.0]
    assert logger.values("test/pred_entropy_mean") == pytest.approx([h[h.isfinite()].mean().item()], rel=1e-6)


def test_histograms_reach_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[EntropyMonitor(histogram_every_n_steps=2)])
    trainer.fit(BoringModel(), random_loader(32, 8), random_loader(8, 4))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert set(events.Tags()["histograms"]) >= {"train/pred_entropy_hist", "val/pred_entropy_hist"}
    # batches 0..3 are logged at steps 0..3 (Lightning's numbering): histograms at steps 0 and 2
    assert [e.step for e in events.Histograms("train/pred_entropy_hist")] == [0, 2]
    assert events.Histograms("val/pred_entropy_hist")[0].histogram_value.num == 8


# --- EntropyController ------------------------------------------------------------------------


def run_pi(entropies, target, kp, ki, initial, low, high, anti_windup, raises=True):
    """The controller's recurrence, written out for the test."""
    integral, coefs = 0.0, []
    for h in entropies:
        error = (target - h) if raises else (h - target)
        integral += error
        if anti_windup:
            integral = min(max(integral, (low - initial) / ki), (high - initial) / ki)
        coefs.append(min(max(initial + kp * error + ki * integral, low), high))
    return coefs


@pytest.mark.parametrize(
    ("kp", "ki", "anti_windup", "raises"), [(0.0, 0.05, True, True), (0.5, 0.2, False, True), (0.3, 0.1, True, False)]
)
def test_controller_on_demo_model_follows_the_pi_recurrence(tmp_path, kp, ki, anti_windup, raises):
    torch.manual_seed(0)
    model = DemoModel(out_dim=10, learning_rate=0.02)
    controller = EntropyController(
        "learning_rate", target=2.2, kp=kp, ki=ki, max_value=0.1, anti_windup=anti_windup, raises_entropy=raises
    )
    _, logger, recorder = fit_with(model, tmp_path, [controller], max_steps=4)
    hand = [entropy_by_hand(out).mean().item() for out in recorder.outputs["train"]]
    assert logger.values("controller/learning_rate_entropy") == pytest.approx(hand, rel=1e-6)
    expected = run_pi(hand, 2.2, kp, ki, 0.02, 0.0, 0.1, anti_windup, raises)
    assert logger.values("controller/learning_rate") == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert model.learning_rate == pytest.approx(expected[-1]) and controller.updates == 4


def test_dual_ascent_is_projected_gradient_ascent(tmp_path):
    """kp = 0 with anti-windup: each update is coef <- clip(coef + ki * (target - H)), SAC's rule."""
    controller = EntropyController("x", target=1.0, kp=0.0, ki=0.5, min_value=0.0, max_value=1.0, initial=0.2)
    coef = 0.2
    for h in [0.0, 0.0, 3.0, 3.0, 3.0, 0.5, 0.9]:
        controller.update(h)
        coef = min(max(coef + 0.5 * (1.0 - h), 0.0), 1.0)
        assert controller.coef == pytest.approx(coef)


def test_controller_updates_every_n_steps_on_the_window_mean(tmp_path):
    torch.manual_seed(0)
    controller = EntropyController("learning_rate", target=2.2, ki=0.01, every_n_steps=2)
    _, logger, recorder = fit_with(DemoModel(), tmp_path, [controller], max_steps=4)
    hand = [entropy_by_hand(out) for out in recorder.outputs["train"]]
    windows = [torch.cat(hand[0:2]).mean().item(), torch.cat(hand[2:4]).mean().item()]
    assert logger.values("controller/learning_rate_entropy") == pytest.approx(windows, rel=1e-6)


def digits_loaders(n_train: int = 256, batch_size: int = 64):
    from entreg.data.digits import load_digits_tensors

    x, y = load_digits_tensors(size=8)
    x = (x - x.mean()) / x.std()
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=True, generator=g)


@pytest.mark.parametrize("target", [0.4, 1.2])
def test_controller_drives_the_confidence_penalty_to_a_target_entropy(tmp_path, target):
    """Closed loop on a real classifier: the penalty's coefficient settles where the training entropy
    sits near the target (without it, training drives the entropy towards 0)."""
    torch.manual_seed(0)
    adamw = functools.partial(torch.optim.AdamW, lr=1e-2)
    model = ClassificationModule("small_cnn", 10, 1, backbone_kwargs={"widths": (8, 16)}, optimizer=adamw)
    controller = EntropyController("confidence_penalty.coef", target=target, kp=1.0, ki=0.2, max_value=5.0)
    monitor = EntropyMonitor(stages=("train",))
    _, logger, _ = fit_with(model, tmp_path, [monitor, controller], train=digits_loaders(), max_epochs=30)
    tail = logger.values("train/pred_entropy")[-20:]
    assert abs(sum(tail) / len(tail) - target) < 0.15 * target
    assert model.confidence_penalty.coef == controller.coef > 0


class _SkipNonFinite(DemoModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss if torch.isfinite(loss) else None  # Lightning skips the optimizer step


def test_controller_ignores_nan_batches(tmp_path):
    x = torch.randn(40, 32)
    x[8:16] = float("nan")  # the whole second batch
    controller = EntropyController("learning_rate", target=2.0, ki=0.01)
    _, logger, recorder = fit_with(_SkipNonFinite(), tmp_path, [controller], train=DataLoader(x, batch_size=8))
    hand = [entropy_by_hand(out).mean().item() for out in recorder.outputs["train"]]
    assert math.isnan(hand[1])
    assert controller.updates == 4 and math.isfinite(controller.integral) and math.isfinite(controller.coef)
    assert logger.values("controller/learning_rate_entropy") == pytest.approx(hand[:1] + hand[2:], rel=1e-6)


def test_controller_state_round_trip_continues_identically(tmp_path):
    a = EntropyController("x", target=1.0, kp=0.2, ki=0.1, initial=0.5, max_value=2.0)
    for h in [0.1, 0.4, 2.0]:
        a.update(h)
    b = EntropyController("x", target=1.0, kp=0.2, ki=0.1, initial=0.5, max_value=2.0)
    b.load_state_dict(a.state_dict())
    for h in [0.3, 0.9]:
        assert b.update(h) == a.update(h) and b.coef == a.coef and b.integral == a.integral


def test_two_controllers_have_distinct_checkpoint_keys():
    a = EntropyController("confidence_penalty.coef", target=1.0)
    b = EntropyController("output_activation.target_entropy", target=1.0)
    assert a.state_key != b.state_key
    assert EntropyMonitor().state_key != EntropyMonitor(module="head").state_key


def test_lightning_module_with_controller_is_independent_of_entreg_modules(tmp_path):
    """One line each on a model entreg did not write, with Lightning's default loggers off."""
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[EntropyMonitor(), EntropyController("learning_rate", target=2.0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = DemoModel()
    trainer.fit(model, random_loader())
    assert "train/pred_entropy_mean" in trainer.callback_metrics
    assert model.learning_rate != 0.02 and model.learning_rate == trainer.callbacks[1].coef
