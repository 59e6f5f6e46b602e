"""FlowMatchingModule: short fits on the ring and on class-conditional digits that approach the data and obey the
requested class, EMA and velocity selection, the loss by hand, checkpoints, skipped non-finite batches, the ring
data, class-conditional denoisers and the ring2d_flow experiment from the command line."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from entreg.data import DigitsDataModule
from entreg.data.digits_nets import digits_classifier, digits_feature_extractor
from entreg.data.ring import RingDataModule
from entreg.diffusion.metrics import sliced_wasserstein
from entreg.flow.diversity import nearest_mode
from entreg.modules.flow import FlowMatchingModule
from entreg.nn.denoisers import MLPDenoiser, build_denoiser, unet2d

from .helpers import make_trainer


def generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tensorboard_images(trainer: L.Trainer) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()["images"]


@pytest.fixture(scope="module")
def ring_fit(tmp_path_factory):
    """A mode-conditional MLP fitted for 10 epochs (160 steps, about 1 s) on the 8-Gaussian ring, logging to
    TensorBoard, with the untrained model's samples for the validation modes and the checkpoint it wrote."""
    tmp_path = tmp_path_factory.mktemp("ring")
    L.seed_everything(0)
    datamodule = RingDataModule(n_train=2000, n_val=500, batch_size=128)
    datamodule.setup("fit")
    model = FlowMatchingModule(
        MLPDenoiser(2, hidden=128, layers=2, num_classes=8),
        num_classes=8,
        ema_decay=0.95,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
        num_val_samples=500,
        reference_mixture=datamodule.mixture,
    )
    labels = datamodule.val_set.tensors[1]
    untrained = model.sample(500, generator=generator(), class_labels=labels)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = make_trainer(tmp_path, max_epochs=10, logger=logger, check_val_every_n_epoch=10)
    trainer.fit(model, datamodule)
    path = tmp_path / "ring.ckpt"
    trainer.save_checkpoint(path)
    return model, trainer, datamodule, untrained, path


def test_ring_samples_approach_the_data(ring_fit):
    model, trainer, datamodule, untrained, _ = ring_fit
    real, labels = datamodule.val_set.tensors
    trained = model.sample(500, generator=generator(), class_labels=labels)

    def distance(x: torch.Tensor) -> float:
        return float(sliced_wasserstein(x, real, 512, generator(0)))

    print(f"sliced W2 to the validation points: untrained {distance(untrained):.3f}, trained {distance(trained):.3f}")
    assert distance(trained) < 0.1 * distance(untrained)  # measured 0.081 vs 1.93
    log_likelihood = [float(datamodule.mixture.log_prob(x.double()).mean()) for x in (untrained, trained, real)]
    assert log_likelihood[1] > log_likelihood[2] - 0.5 and log_likelihood[1] > log_likelihood[0] + 20
    # validation sampled (fixed noise, the validation modes), logged the same metrics and a 2-D histogram
    assert float(trainer.callback_metrics["val/sliced_wasserstein"]) < 0.2
    assert float(trainer.callback_metrics["val/log_likelihood"]) > log_likelihood[2] - 0.5
    assert "val/samples" in tensorboard_images(trainer)


def test_ring_samples_land_on_the_requested_mode(ring_fit):
    model, _, datamodule, untrained, _ = ring_fit
    requested = torch.arange(400) % 8
    samples = model.sample(400, generator=generator(), class_labels=requested)
    agreement = float((nearest_mode(samples, datamodule.centers)[0] == requested).float().mean())
    chance = float((nearest_mode(untrained, datamodule.centers)[0] == datamodule.val_set.tensors[1]).float().mean())
    print(f"samples on the requested mode: trained {agreement:.3f}, untrained {chance:.3f} (chance 0.125)")
    assert agreement > 0.95 and chance < 0.3


def test_sample_and_velocity_use_the_selected_weights(ring_fit):
    model = copy.deepcopy(ring_fit[0])
    assert int(model.ema.n_averaged) == ring_fit[1].global_step > 0
    x, t, y = torch.randn(5, 2, generator=generator()), torch.rand(5, generator=generator()), torch.arange(5)
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t, y), model.ema.module(x, 1000 * t, class_labels=y))
        torch.testing.assert_close(model.velocity(x, t, y, ema=False), model.net(x, 1000 * t, class_labels=y))
        torch.testing.assert_close(model(x, t, y), model.velocity(x, t, y, ema=False))
        assert not torch.allclose(model.velocity(x, t, y), model.velocity(x, t, y, ema=False))
    t.requires_grad_(True)
    model.velocity(x, t, y, ema=False).sum().backward()  # differentiable for GRPO
    assert t.grad is not None and model.net.input.weight.grad is not None
    before = model.sample(8, 5, 2.0, generator(), y.repeat(2)[:8])
    with torch.no_grad():
        for param in model.net.parameters():  # the trained weights do not enter EMA sampling
            param.add_(1.0)
    assert torch.equal(model.sample(8, 5, 2.0, generator(), y.repeat(2)[:8]), before)
    assert not torch.allclose(model.sample(8, 5, 2.0, generator(), y.repeat(2)[:8], ema=False), before)
    # the labels matter, and None is the (here untrained) null class
    assert not torch.allclose(model.sample(8, 5, 2.0, generator(), torch.zeros(8)), before)
    torch.testing.assert_close(
        model.sample(8, 5, 2.0, generator()), model.sample(8, 5, 2.0, generator(), torch.full((8,), 8))
    )


def test_checkpoint_round_trip_restores_the_ema(ring_fit):
    model, _, _, _, path = ring_fit
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["entreg_denoiser"] == {"name": "mlp", "kwargs": model.net.spec()["kwargs"]}
    assert checkpoint["entreg_denoiser"]["kwargs"]["num_classes"] == 8
    loaded = FlowMatchingModule.load_checkpoint(path)  # the net rebuilt from its spec
    for name, value in model.ema.state_dict().items():
        assert torch.equal(loaded.ema.state_dict()[name], value), name
    assert loaded.num_classes == 8 and loaded.hparams.ema_decay == 0.95 and loaded.time_scale == 1000.0
    labels = torch.arange(16) % 8
    torch.testing.assert_close(
        loaded.sample(16, 4, 3.0, generator(), labels), model.sample(16, 4, 3.0, generator(), labels), atol=0, rtol=0
    )


@pytest.fixture(scope="module")
def digits_fit(tmp_path_factory):
    """A class-conditional MLP on flattened 8x8 digits in [-1, 1] fitted for 10 epochs (80 steps, about 1 s)."""
    tmp_path = tmp_path_factory.mktemp("digits")
    L.seed_everything(0)
    model = FlowMatchingModule(
        MLPDenoiser(64, shape=(1, 8, 8), num_classes=10),
        num_classes=10,
        ema_decay=0.99,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
        sample_steps=10,
        num_val_samples=200,
        feature_extractor=digits_feature_extractor(size=8),
    )
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = make_trainer(tmp_path, max_epochs=10, logger=logger, check_val_every_n_epoch=10)
    trainer.fit(model, DigitsDataModule(size=8, scale="minus_one_one", batch_size=128))
    return model, trainer


def test_digits_samples_show_the_requested_class(digits_fit):
    model, trainer = digits_fit
    classifier = digits_classifier(seed=0, arch="mlp")  # a separately trained judge (97% test accuracy)
    requested = torch.arange(200) % 10
    samples = model.sample(200, generator=generator(), class_labels=requested)
    accuracy = float((classifier(samples).argmax(1) == requested).float().mean())
    as_other = float((classifier(samples).argmax(1) == requested.roll(1)).float().mean())
    print(f"judge agrees with the requested class: {accuracy:.3f} (another class: {as_other:.3f}; chance 0.1)")
    assert accuracy > 0.7 and as_other < 0.1  # measured 0.92 and 0.015
    assert 0 < float(trainer.callback_metrics["val/fd"]) < 30  # noise: about 200
    assert "val/samples" in tensorboard_images(trainer)


def test_loss_is_the_velocity_mse_at_the_interpolant():
    model = FlowMatchingModule(MLPDenoiser(3, hidden=8, num_classes=4), num_classes=4, time_scale=10.0)
    x0, labels = torch.randn(6, 3, generator=generator(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    loss = model.flow_matching_loss(model.net, x0, labels, generator(3))
    g = generator(3)
    noise, t = torch.randn(6, 3, generator=g), torch.rand(6, generator=g)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    by_hand = torch.nn.functional.mse_loss(model.net(x_t, 10 * t, class_labels=labels), noise - x0)
    torch.testing.assert_close(loss, by_hand)


def test_logit_normal_times():
    model = FlowMatchingModule(MLPDenoiser(2, hidden=8), time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = model.sample_times(20000, generator(0))
    logit = torch.log(t / (1 - t))
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.8) < 0.03
    uniform = FlowMatchingModule(MLPDenoiser(2, hidden=8)).sample_times(20000, generator(0))
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.var()) - 1 / 12) < 0.003


class LabelSpy(MLPDenoiser):
    def forward(self, x, t, class_labels=None):
        self.seen.append(class_labels)
        return super().forward(x, t, class_labels)


def test_class_dropout_trains_the_null_class(tmp_path):
    net = LabelSpy(2, hidden=8, num_classes=3)
    net.seen = []
    model = FlowMatchingModule(net, num_classes=3, class_dropout=0.5, sample_every_n_epochs=0)
    data = TensorDataset(torch.randn(400, 2), torch.arange(400) % 3)
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(model, DataLoader(data, batch_size=400))
    (labels,) = net.seen
    null = labels == 3
    assert 0.4 < float(null.float().mean()) < 0.6
    torch.testing.assert_close(labels[~null], (torch.arange(400) % 3)[~null])


def test_non_finite_batch_is_skipped_and_leaves_every_weight_unchanged(tmp_path):
    model = FlowMatchingModule(MLPDenoiser(2, hidden=8, num_classes=2), num_classes=2, sample_every_n_epochs=0)
    before = copy.deepcopy(model.state_dict())
    data = TensorDataset(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="Non-finite training loss"):
        trainer.fit(model, DataLoader(data, batch_size=4))
    assert model.skipped_steps == 1 and int(model.ema.n_averaged) == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not trainer.optimizers[0].state  # no optimizer step either


def test_invalid_arguments_are_rejected():
    net = MLPDenoiser(2, hidden=8)
    for kwargs, match in [
        ({"time_sampling": "beta"}, "uniform.*logit_normal"),
        ({"ema_decay": 1.0}, r"\[0, 1\)"),
        ({"class_dropout": 0.1}, "needs num_classes"),
        ({"num_classes": 0}, "num_classes"),
        ({"sample_shift": 0.0}, "sample_shift > 0"),
        ({"sample_steps": 0}, "sample_steps >= 1"),
        ({"data_range": (1, -1)}, "low < high"),
    ]:
        with pytest.raises(ValueError, match=match):
            FlowMatchingModule(net, **kwargs)
    model = FlowMatchingModule(MLPDenoiser(2, hidden=8, num_classes=3), num_classes=3)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model.sample(4, 2, class_labels=torch.zeros(3))
    with pytest.raises(ValueError, match="needs batches"):
        model.training_step(torch.zeros(4, 2), 0)
    with pytest.raises(ValueError, match="steps"):
        model.sample(4, 0)


def test_ring_data_is_seeded_and_labelled_by_mode():
    a, b = RingDataModule(n_train=300, n_val=100, seed=3), RingDataModule(n_train=300, n_val=100, seed=3)
    a.setup("fit")
    b.setup("fit")
    for split in ("train_set", "val_set", "test_set"):
        for left, right in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(left, right)
    x, mode = a.train_set.tensors
    assert x.dtype == torch.float32 and set(mode.tolist()) == set(range(8)) and a.num_classes == 8
    torch.testing.assert_close(a.centers.norm(dim=1), torch.full((8,), 4.0))
    assert float((nearest_mode(x, a.centers)[0] == mode).float().mean()) > 0.99  # std 0.25, centres 3.06 apart
    assert abs(float((x - a.centers[mode]).std()) - 0.25) < 0.02
    assert not torch.equal(a.val_set.tensors[0], a.test_set.tensors[0])
    with pytest.raises(ValueError, match="std"):
        RingDataModule(std=0.0)


@pytest.mark.parametrize("kind", ["mlp", "unet2d"])
def test_conditional_denoisers_round_trip_and_use_the_label(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLPDenoiser(4, hidden=16, num_classes=3), torch.randn(2, 4)
    else:
        net, x = unet2d(8, block_out_channels=(8, 16), num_classes=3), torch.randn(2, 1, 8, 8)
    rebuilt = build_denoiser(net.spec())
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.num_classes == 3
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        out = net(x, t, class_labels=torch.tensor([0, 1]))
        torch.testing.assert_close(rebuilt(x, t, class_labels=torch.tensor([0, 1])), out)
        assert not torch.allclose(net(x, t, class_labels=torch.tensor([2, 2])), out)
        torch.testing.assert_close(net(x, t), net(x, t, class_labels=torch.tensor([3, 3])))  # None: null class
    unconditional = MLPDenoiser(4, hidden=16) if kind == "mlp" else unet2d(8, block_out_channels=(8, 16))
    assert "num_classes" not in unconditional.spec()["kwargs"]  # specs of earlier checkpoints still build
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        net(x, t, class_labels=torch.tensor([0, 1, 2]))


def test_ring2d_flow_experiment_runs_from_the_command_line(tmp_path):
    args = [
        sys.executable,
        "-m",
        "entreg.train",
        "experiment=ring2d_flow",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "model.num_val_samples=50",
        "model.sample_steps=4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ENTREG_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "ring2d_flow" / "runs").iterdir()
    loaded = FlowMatchingModule.load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert loaded.num_classes == 8 and loaded.sample(3, 2, class_labels=torch.arange(3)).shape == (3, 2)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
