"""DiffusionModule: short fits that beat noise and the untrained model, EMA, checkpoints, prediction targets,
skipped non-finite batches, and the entreg-sample CLI."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from entreg.data import DigitsDataModule, GaussianMixtureDataModule
from entreg.data.digits_nets import digits_feature_extractor
from entreg.diffusion.metrics import frechet_distance
from entreg.modules.diffusion import PREDICTION_TYPES, DiffusionModule
from entreg.nn.denoisers import MLPDenoiser

from .helpers import make_trainer

N_COMPARE = 200  # samples and real digits compared by the Frechet distance


def generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def feature_extractor() -> torch.nn.Module:
    return digits_feature_extractor(seed=0, size=8)


@pytest.fixture(scope="module")
def digits_fit(tmp_path_factory, feature_extractor):
    """An MLP (flattened 8x8 digits in [-1, 1], v-prediction) fitted for 40 epochs (320 steps), logging to
    TensorBoard, with the untrained model's samples and the checkpoint it wrote."""
    tmp_path = tmp_path_factory.mktemp("digits")
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0)
    datamodule = DigitsDataModule(size=8, scale="minus_one_one", batch_size=128)
    model = DiffusionModule(
        MLPDenoiser(64, shape=(1, 8, 8)),
        prediction_type="v_prediction",
        ema_decay=0.99,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
        num_val_samples=N_COMPARE,
        feature_extractor=feature_extractor,
    )
    untrained = model.sample(N_COMPARE, generator=generator())
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = make_trainer(tmp_path, max_epochs=40, logger=logger, check_val_every_n_epoch=40, log_every_n_steps=50)
    trainer.fit(model, datamodule)
    path = tmp_path / "digits.ckpt"
    trainer.save_checkpoint(path)
    return model, trainer, datamodule, untrained, path


def test_digits_samples_beat_noise_and_the_untrained_model(digits_fit, feature_extractor):
    model, trainer, datamodule, untrained, _ = digits_fit
    real = datamodule.val_set.tensors[0][:N_COMPARE]

    def distance(x: torch.Tensor) -> float:
        return frechet_distance(feature_extractor(real), feature_extractor(x))

    trained = distance(model.sample(N_COMPARE, generator=generator()))
    noise = distance(torch.randn(N_COMPARE, 1, 8, 8, generator=generator()))
    print(f"classifier-feature FD: trained {trained:.1f}, noise {noise:.1f}, untrained {distance(untrained):.1f}")
    assert trained < 0.2 * noise and trained < 0.2 * distance(untrained)
    # the validation epoch sampled from fixed noise, logged the same distance and an image grid
    assert 0 < float(trainer.callback_metrics["val/fd"]) < 0.2 * noise
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    assert "val/samples" in events.Tags()["images"]


def test_sample_uses_the_ema_weights(digits_fit):
    model, trainer = copy.deepcopy(digits_fit[0]), digits_fit[1]
    raw, ema = dict(model.denoiser.named_parameters()), dict(model.ema.module.named_parameters())
    assert any(not torch.equal(raw[name], ema[name]) for name in raw)
    assert int(model.ema.n_averaged) == trainer.global_step > 0
    before = model.sample(8, "ddim", 5, generator())
    with torch.no_grad():
        for param in model.denoiser.parameters():  # the raw weights do not enter sampling
            param.add_(1.0)
    assert torch.equal(model.sample(8, "ddim", 5, generator()), before)
    model.ema.module.load_state_dict(model.denoiser.state_dict())
    assert not torch.allclose(model.sample(8, "ddim", 5, generator()), before)


def test_checkpoint_round_trip_restores_the_ema(digits_fit):
    model, _, _, _, path = digits_fit
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["entreg_denoiser"]["name"] == "mlp"
    assert not any(key.startswith("feature_extractor.") for key in checkpoint["state_dict"])
    loaded = DiffusionModule.load_checkpoint(path)  # denoiser rebuilt from its spec, no feature extractor
    for name, value in model.ema.state_dict().items():
        assert torch.equal(loaded.ema.state_dict()[name], value), name
    assert loaded.prediction_type == "v_prediction" and loaded.hparams.ema_decay == 0.99
    assert torch.equal(loaded.sample(4, "unipc", 4, generator()), model.sample(4, "unipc", 4, generator()))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_targets(prediction_type):
    from diffusers import DDPMScheduler

    model = DiffusionModule(MLPDenoiser(3, hidden=8), prediction_type=prediction_type)
    g = generator(0)
    x0, noise = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    abar = DDPMScheduler().alphas_cumprod[t, None]
    expected = {"epsilon": noise, "sample": x0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}
    target = model.prediction_target(x0, noise, t)
    torch.testing.assert_close(target, expected[prediction_type])
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, DDPMScheduler().get_velocity(x0, noise, t))
    # the loss is the MSE of the denoiser's prediction at the noisy input, with the same draws
    torch.manual_seed(3)
    loss = model.diffusion_loss(model.denoiser, x0)
    torch.manual_seed(3)
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (5,))
    noisy = DDPMScheduler().add_noise(x0, noise, t)
    by_hand = torch.nn.functional.mse_loss(model.denoiser(noisy, t), model.prediction_target(x0, noise, t))
    torch.testing.assert_close(loss, by_hand)


def test_invalid_arguments_name_the_valid_values():
    with pytest.raises(ValueError, match=r"epsilon.*sample.*v_prediction"):
        DiffusionModule(MLPDenoiser(2), prediction_type="x0")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DiffusionModule(MLPDenoiser(2), ema_decay=1.0)
    with pytest.raises(ValueError, match="dpmsolver"):
        DiffusionModule(MLPDenoiser(2), sample_scheduler="heun")
    model = DiffusionModule(MLPDenoiser(2), prediction_type="sample")
    with pytest.raises(ValueError, match="expects 'epsilon'"):
        from diffusers import DDIMScheduler

        model.sample(2, DDIMScheduler())


def test_non_finite_batch_is_skipped_and_leaves_every_weight_unchanged(tmp_path):
    model = DiffusionModule(MLPDenoiser(2, hidden=8), sample_every_n_epochs=0)
    before = copy.deepcopy(model.state_dict())
    data = torch.full((4, 2), float("nan"))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="Non-finite training loss"):
        trainer.fit(model, DataLoader(TensorDataset(data), batch_size=4))
    assert model.skipped_steps == 1 and int(model.ema.n_averaged) == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not trainer.optimizers[0].state  # no optimizer step either


@pytest.mark.parametrize(("interval", "steps"), [("step", 6), ("epoch", 2)])
def test_the_lr_scheduler_steps_every_optimizer_step_or_every_epoch(interval, steps, tmp_path):
    """2 epochs of 3 batches: the scheduler (halving the lr) steps 6 times per step, twice per epoch, and its
    state is in the checkpoint."""
    halve = partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5)
    model = DiffusionModule(
        MLPDenoiser(2, hidden=8), optimizer=partial(torch.optim.SGD, lr=0.01), scheduler=halve,
        scheduler_interval=interval, sample_every_n_epochs=0,
    )  # fmt: skip
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**steps)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    (saved,) = torch.load(tmp_path / "last.ckpt", weights_only=True)["lr_schedulers"]
    assert saved["last_epoch"] == steps
    with pytest.raises(ValueError, match=r"scheduler_interval must be one of \('step', 'epoch'\), got 'batch'"):
        DiffusionModule(MLPDenoiser(2), scheduler=halve, scheduler_interval="batch")


@pytest.fixture(scope="module")
def gmm_fit(tmp_path_factory):
    """An MLP fitted for 25 epochs (200 steps) on a 2-D, 8-component mixture, with the untrained samples."""
    tmp_path = tmp_path_factory.mktemp("gmm")
    L.seed_everything(0)
    datamodule = GaussianMixtureDataModule(dim=2, n_train=2000, n_val=500)
    model = DiffusionModule(
        MLPDenoiser(2, hidden=128),
        prediction_type="v_prediction",
        ema_decay=0.95,
        optimizer=partial(torch.optim.AdamW, lr=2e-3),
        num_val_samples=500,
        reference_mixture=datamodule.mixture,
    )
    untrained = model.sample(1000, generator=generator())
    trainer = make_trainer(tmp_path, max_epochs=25, check_val_every_n_epoch=25)
    trainer.fit(model, datamodule)
    path = tmp_path / "gmm.ckpt"
    trainer.save_checkpoint(path)
    return model, trainer, datamodule, untrained, path


def test_gmm_samples_gain_likelihood_under_the_true_mixture(gmm_fit):
    model, trainer, datamodule, untrained, _ = gmm_fit
    mixture = datamodule.mixture
    trained = float(mixture.log_prob(model.sample(1000, generator=generator()).double()).mean())
    before = float(mixture.log_prob(untrained.double()).mean())
    truth = float(mixture.log_prob(datamodule.val_set.tensors[0].double()).mean())
    print(f"mean log-likelihood: trained {trained:.2f}, untrained {before:.2f}, data {truth:.2f}")
    assert trained > before + 2.0
    assert float(trainer.callback_metrics["val/log_likelihood"]) > before + 2.0
    assert float(trainer.callback_metrics["val/sliced_wasserstein"]) < 0.5


@pytest.mark.parametrize("case", ["digits", "gmm"])
def test_entreg_sample_writes_a_png_and_metrics(case, request, tmp_path):
    from hydra import compose, initialize_config_module

    from entreg.cli import sample

    path = request.getfixturevalue(f"{case}_fit")[-1]
    overrides = [f"ckpt_path={path}", f"paths.output_dir={tmp_path}", "num_inference_steps=6", "n=64"]
    if case == "digits":
        overrides += ["sampler=evodiff", "data=digits_diffusion", "data.size=8"]
        overrides += ["+feature_extractor._target_=entreg.data.digits_nets.digits_feature_extractor"]
        overrides += ["+feature_extractor.size=8", "+feature_extractor.steps=50"]
    else:
        overrides += ["sampler=euler", "data=gmm2d", "data.n_train=2000", "data.n_val=500"]
    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    metrics = sample(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert written["n"] == 64 and written["finite_fraction"] == 1.0 and written["num_inference_steps"] == 6
    expected = {"fd"} if case == "digits" else {"log_likelihood", "sliced_wasserstein"}
    assert expected <= set(written) and all(math.isfinite(metrics[name]) for name in expected)


def test_ema_warms_up_like_diffusers():
    model = DiffusionModule(MLPDenoiser(2), ema_decay=0.99)
    raw, averaged = next(model.denoiser.parameters()), next(model.ema.module.parameters())
    with torch.no_grad():
        raw.fill_(1.0)
    model.ema.update_parameters(model.denoiser)  # the first update copies
    with torch.no_grad():
        raw.fill_(3.0)
    model.ema.update_parameters(model.denoiser)  # n = 1: decay min(0.99, 2 / 11)
    torch.testing.assert_close(averaged, torch.full_like(raw, 1.0 + (1 - 2 / 11) * 2.0))
