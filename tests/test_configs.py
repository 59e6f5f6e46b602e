"""Every config file composes and instantiates; every experiment runs and ranks its checkpoints by a metric its
module logs; the default fit learns."""

from __future__ import annotations

import math
from pathlib import Path

import entreg.configs
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from entreg.callbacks import TestTimeAdaptation
from entreg.cli import adapt, instantiate_group, train

from .test_data import write_fake_cifar10, write_image_folder

CONFIG_DIR = Path(entreg.configs.__file__).parent
GROUPS = ("data", "model", "backbone", "callbacks", "logger", "trainer")
ADAPT_GROUPS = ("method", "stream", "protocol")  # protocol/: tests/test_tta_protocols.py
DIFFUSION_DATA = {"diffusion_unet": ["data=digits_diffusion", "data.size=8"], "diffusion_mlp": ["data=gmm2d"]}
DIFFUSION_DATA |= {"flow_unet": DIFFUSION_DATA["diffusion_unet"], "flow_mlp": DIFFUSION_DATA["diffusion_mlp"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def is_adapt_model(option: str) -> bool:
    """Whether ``configs/model/<option>.yaml`` builds an entreg-adapt source model (its ``_target_`` is a
    PretrainedClassifier or one of its builders) rather than an entreg-train model."""
    from hydra.utils import get_object

    from entreg.modules import PretrainedClassifier

    target = OmegaConf.load(CONFIG_DIR / "model" / f"{option}.yaml").get("_target_")
    built = get_object(target) if target else None
    owner = getattr(built, "__self__", built)  # a classmethod builder's class
    return isinstance(owner, type) and issubclass(owner, PretrainedClassifier)


ADAPT_MODELS = [option for option in options("model") if is_adapt_model(option)]  # test_every_adapt_model_config
TRAIN_MODELS = [option for option in options("model") if option not in ADAPT_MODELS]


def takes_backbone(target: str) -> bool:
    """Whether the LightningModule ``target`` is built around a backbone (the backbone/ group)."""
    import inspect

    from hydra.utils import get_class

    return "backbone" in inspect.signature(get_class(target)).parameters


def test_every_config_file_is_covered_here():
    groups = (*GROUPS, "experiment", *ADAPT_GROUPS, "sampler", "grpo", "reward", "monitor", "t2i", "env")
    covered = {f"{group}/{name}" for group in groups for name in options(group)}
    covered |= {
        "train",
        "adapt",
        "sample",
        "finetune",
        "paths/default",
        "hydra/default",
    }  # composed by every test below and by the CLI tests
    files = {str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml")}
    assert files == covered


@pytest.fixture
def data_on_disk(tmp_path, monkeypatch):
    """Overrides that point the on-disk data configs at tiny real-layout copies."""
    from torchvision.datasets import CIFAR10

    write_fake_cifar10(tmp_path / "cifar10")
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    write_image_folder(tmp_path / "images")
    return {
        "cifar10": [f"data.data_dir={tmp_path / 'cifar10'}", "data.val_size=10", "data.num_workers=0"],
        "image_folder": [f"data.data_dir={tmp_path / 'images'}", "data.num_classes=3", "data.num_workers=0"],
    }


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in (TRAIN_MODELS if g == "model" else options(g))]
)
def test_config_composes_and_instantiates(group, option, compose_train, data_on_disk):
    overrides = [f"{group}={option}"]
    if group == "data":
        overrides += data_on_disk.get(option, [])
    if group == "trainer" and "gpu" in option and not torch.cuda.is_available():
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    if group == "model" and not takes_backbone(compose_train(*overrides).model._target_):  # generative, RL
        overrides += ["~backbone", *DIFFUSION_DATA.get(option, [])]
    cfg = compose_train(*overrides, fast=group not in ("callbacks", "logger"))
    if group == "data":
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        if len(batch) == 1:  # unlabelled points
            assert batch[0].shape[1:] == (cfg.data.dim,)
        elif option == "ring2d":  # 2-D points labelled by their mode
            x, y = batch
            assert x.shape[1:] == (2,) and int(y.max()) < cfg.data.modes
        else:
            x, y = batch
            assert x.shape[1] == cfg.data.channels and int(y.max()) < cfg.data.num_classes
    elif option in DIFFUSION_DATA:
        model = instantiate(cfg.model, _convert_="all").eval()
        flow = option.startswith("flow")  # flow models take t in [0, 1] and `steps`
        x = model.sample(2, steps=2) if flow else model.sample(2, num_inference_steps=2)
        t = torch.tensor([0.0, 1.0]) if flow else torch.tensor([1, 999])
        assert x.shape[1:] == model.sample_shape and model(x, t).shape == x.shape
    elif "env_id" in cfg.model:  # an RL agent: it steps its own MuJoCo env (extra entreg[rl])
        pytest.importorskip("mujoco")
        from entreg.rl.envs import env_spaces

        observations, actions = env_spaces(cfg.model.env_id)
        model = instantiate(cfg.model, _convert_="all")
        assert tuple(model.act(torch.zeros(observations.shape)).shape) == actions.shape
    elif group in ("model", "backbone"):
        model = instantiate(cfg.model, _convert_="all")
        size = 32
        logits = model.eval()(torch.randn(2, cfg.data.channels, size, size))
        assert logits.shape == (2, cfg.data.num_classes)
    elif group == "callbacks":
        assert len(instantiate_group(cfg.callbacks)) == len([k for k, v in (cfg.callbacks or {}).items() if v])
    elif group == "logger":
        assert len(instantiate_group(cfg.logger)) == len(cfg.logger or {})
    else:
        trainer = instantiate(cfg.trainer, _convert_="all")
        assert trainer.max_epochs == cfg.trainer.max_epochs


def choices(*overrides: str) -> dict[str, str | None]:
    """The option of each config group that ``train`` with ``overrides`` composes (``{"data": "cifar10", ...}``)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return dict(cfg.hydra.runtime.choices)


QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
QUIET += ["callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=none"]  # model_checkpoint stays
EPOCH = ["trainer.max_epochs=1", *(f"+trainer.limit_{stage}_batches=1" for stage in ("train", "val", "test"))]
SAMPLES = ["model.sample_every_n_epochs=1", "model.sample_steps=2", "model.num_val_samples=8", "data.batch_size=8"]
TINY = {  # per module: one batch of each stage, or a few env steps whose last epoch ends with an evaluation
    "ClassificationModule": EPOCH,
    "DiffusionModule": [*EPOCH, *SAMPLES],
    "FlowMatchingModule": [*EPOCH, *SAMPLES],
    "SACModule": ["model.total_steps=24", "model.steps_per_epoch=12", "model.eval_every=12", "model.learning_starts=8",
                  "model.batch_size=8", "model.hidden=[8,8]", "model.eval_episodes=1",
                  "+model.env_kwargs.max_episode_steps=20"],
    "PPOModule": ["model.n_steps=16", "model.total_steps=64", "model.steps_per_epoch=32", "model.eval_every=32",
                  "model.batch_size=16", "model.n_epochs=1", "model.hidden=[8,8]", "model.eval_episodes=1",
                  "+model.env_kwargs.max_episode_steps=50"],
}  # fmt: skip
TINY_DATA = {"digits_diffusion": ["data.size=8"]}


def check_rl_run(experiment: str, cfg, metrics: dict[str, float]) -> None:
    """An RL experiment has no data and no test; it uses ERA exactly when its name ends with ``_era``, and then the
    policy's Gaussian entropy (``policy/gaussian_entropy``, logged by SAC and PPO alike) is ERA's target (per action
    dimension times the action dimensions); it ran all its env steps and evaluated."""
    from entreg.rl.envs import env_spaces

    assert cfg.data is None and cfg.test is False
    assert (cfg.model.era_entropy_per_dim is not None) == experiment.endswith("_era")
    assert math.isfinite(metrics["eval/return"]) and metrics["step"] == cfg.model.total_steps
    if cfg.model.era_entropy_per_dim is not None:
        _, action_space = env_spaces(cfg.model.env_id)
        target = cfg.model.era_entropy_per_dim * action_space.shape[0]
        assert metrics["policy/gaussian_entropy"] == pytest.approx(target, abs=1e-4)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_and_ranks_its_checkpoints(experiment, compose_train, data_on_disk, tmp_path):
    """A few steps of each experiment with its real checkpoint callback: the best checkpoint is ranked by the
    model's `monitor` metric, which the module really logs (a missing one would leave the ranking empty)."""
    plan = compose_train(f"experiment={experiment}")
    if "env_id" in plan.model:  # RL agents step MuJoCo envs (extra entreg[rl])
        pytest.importorskip("mujoco")
    data = choices(f"experiment={experiment}")["data"]
    overrides = [*TINY[plan.model._target_.rsplit(".", 1)[-1]], *data_on_disk.get(data, []), *TINY_DATA.get(data, [])]
    cfg = compose_train(f"experiment={experiment}", *QUIET, *overrides, fast=False)
    metrics = train(cfg)
    if cfg.test:
        assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/nll"] > 0
    else:  # every logged metric, the monitored one among them
        assert math.isfinite(metrics[cfg.monitor.metric])
    if "sample_steps" in cfg.model:  # a generative model evaluates its samples
        assert ("val/fd" if cfg.model.feature_extractor else "val/log_likelihood") in metrics
    if "env_id" in cfg.model:
        check_rl_run(experiment, cfg, metrics)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    (ranking,) = [state for name, state in last["callbacks"].items() if name.startswith("ModelCheckpoint")]
    assert cfg.monitor.metric is not None and cfg.callbacks.model_checkpoint.monitor == cfg.monitor.metric
    assert math.isfinite(ranking["best_model_score"]) and Path(ranking["best_model_path"]).is_file()


def test_every_monitor_config_is_the_choice_of_a_model_or_command(compose_train):
    """Each file of configs/monitor/ is what some model config (or entreg-finetune) ranks its checkpoints by."""
    chosen = {compose_train(f"model={model}").monitor.metric for model in TRAIN_MODELS}
    chosen.add(compose_finetune().monitor.metric)
    assert chosen == {OmegaConf.load(CONFIG_DIR / "monitor" / f"{o}.yaml").monitor.metric for o in options("monitor")}


def test_default_experiment_reaches_90_percent(compose_train, tmp_path):
    cfg = compose_train("callbacks.progress_bar=null", "trainer.enable_progress_bar=false", fast=False)
    assert cfg.model.output_activation == "era" and cfg.model.backbone == "small_cnn"
    metrics = train(cfg)
    assert metrics["test/acc"] >= 0.90
    assert metrics["test/entropy_min"] >= cfg.model.output_activation_kwargs.target_entropy  # the ERA floor
    assert list((tmp_path / "checkpoints").glob("*.ckpt")), "no checkpoint written"
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"


@pytest.fixture
def digits_checkpoint(tmp_path):
    """A small classifier trained for one epoch on 8x8 digits, saved as entreg-train would."""
    import lightning as L

    from entreg.data import DigitsDataModule
    from entreg.modules import ClassificationModule

    torch.manual_seed(0)
    model = ClassificationModule("small_cnn", 10, 1, backbone_kwargs={"widths": (8, 16)})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, DigitsDataModule(size=8, batch_size=64))
    path = tmp_path / "digits.ckpt"
    trainer.save_checkpoint(path)
    return path


def compose_adapt(tmp_path, *overrides: str):
    from hydra import compose, initialize_config_module

    base = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    base += ["logger=none", "stream.size=8", f"paths.output_dir={tmp_path}"]
    with initialize_config_module("entreg.configs", version_base="1.3"):
        return compose("adapt", overrides=[*base, *overrides])


@pytest.mark.parametrize("method", options("method"))
def test_every_method_config_adapts(method, tmp_path, digits_checkpoint):
    cfg = compose_adapt(tmp_path, f"method={method}", f"ckpt_path={digits_checkpoint}", "stream.severity=2")
    assert isinstance(instantiate(cfg.method), TestTimeAdaptation)
    metrics = adapt(cfg)
    assert set(metrics) >= {"gaussian_noise/source", "gaussian_noise/online", "gaussian_blur/adapted"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def adapt_model_files(option: str, tmp_path: Path) -> list[str]:
    """Overrides that point the adapt model config ``option`` at a small random-weights file in its real format."""
    if option == "robustbench":  # RobustBench's AugMix WRN-40-2 layout: 'state_dict' with module. prefixes, no mu/sigma
        from entreg.nn.robustbench import robustbench_architecture

        state = robustbench_architecture("Hendrycks2020AugMix_WRN", "cifar100").state_dict()
        state = {f"module.{k}": v for k, v in state.items() if k not in ("mu", "sigma")}
        torch.save({"state_dict": state}, tmp_path / "Hendrycks2020AugMix_WRN.pt")
        names = ["model.name=Hendrycks2020AugMix_WRN", "model.dataset=cifar100"]
        return [*names, f"model.file={tmp_path / 'Hendrycks2020AugMix_WRN.pt'}"]
    if option == "timm_pretrained":
        import timm
        from safetensors.torch import save_file

        save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), str(tmp_path / "r.safetensors"))
        return ["model.name=resnet10t.c3_in1k", f"model.file={tmp_path / 'r.safetensors'}"]
    if option == "torchvision_pretrained":
        import torchvision

        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
        return ["model.name=resnet18", f"model.file={tmp_path / 'resnet18-f37072fd.pth'}"]
    raise AssertionError(f"model/{option}.yaml builds an adapt model: add a weights file for it here")


@pytest.mark.parametrize("option", ADAPT_MODELS)
def test_every_adapt_model_config(option, tmp_path):
    """Each source-model config composes with adapt.yaml and builds a PretrainedClassifier from a file in its real
    format, at its preprocessing's input size; entreg-adapt passes the stream's class subset as a keyword."""
    from entreg.modules import PretrainedClassifier

    adapt_defaults = OmegaConf.load(CONFIG_DIR / "adapt.yaml").defaults
    group = "model" if any("model" in entry for entry in adapt_defaults if not isinstance(entry, str)) else "+model"
    cfg = compose_adapt(tmp_path, f"{group}={option}", *adapt_model_files(option, tmp_path))
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, PretrainedClassifier) and model.hparams.source["file"] == cfg.model.file
    assert model.hparams.num_classes == {"robustbench": 100}.get(option, 1000)
    x = torch.rand(2, *model.data_config.input_size)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, model.hparams.num_classes)
    subset = instantiate(cfg.model, class_subset=[3, 1, 4], _convert_="all").eval()
    with torch.no_grad():
        torch.testing.assert_close(subset(x), model(x)[:, [3, 1, 4]], rtol=0, atol=0)


@pytest.mark.parametrize("stream", [name for name in options("stream") if name.startswith("digits")])
def test_every_digits_stream_config(stream, tmp_path):
    """The digits streams; the benchmark streams (CIFAR-C, ImageNet-C/R/A, folders) are instantiated on fixtures in
    their published formats by tests/test_streams_configs.py, which checks that it lists every other stream."""
    overrides = []
    if stream == "digits_c":  # 32 px, a 10-image test split and 2 corruptions, cached under tmp_path
        pytest.importorskip("imagecorruptions")
        overrides = ["stream.size=32", "stream.split=[1000,787,10]", "stream.shifts=[gaussian_noise,frost]"]
        overrides += [f"stream.cache_dir={tmp_path / 'digits_c'}"]
    cfg = compose_adapt(tmp_path, f"stream={stream}", "ckpt_path=unused", *overrides)
    datamodule = instantiate(cfg.stream, _convert_="all")
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    assert len(loaders) == (1 if cfg.stream.mixed else len(cfg.stream.shifts))
    _, labels = next(iter(loaders[0]))
    if cfg.stream.class_sorted:
        assert bool((labels[1:] >= labels[:-1]).all())


# sampler=pipeline (the pipeline's own scheduler) samples pipelines only: tests/test_sample_pipeline.py
@pytest.mark.parametrize("sampler", [o for o in options("sampler") if o != "pipeline"])
def test_every_sampler_config_samples(sampler):
    from hydra import compose, initialize_config_module

    from entreg.modules.diffusion import DiffusionModule
    from entreg.nn.denoisers import MLPDenoiser

    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("sample", overrides=[f"sampler={sampler}", "ckpt_path=unused", "paths.output_dir=unused"])
    model = DiffusionModule(MLPDenoiser(2, hidden=8), prediction_type="v_prediction")
    scheduler = model.make_scheduler(cfg.sampler.scheduler, **cfg.sampler.options)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "linear"
    x = model.sample(3, scheduler, 4, torch.Generator().manual_seed(0))
    assert x.shape == (3, 2) and bool(torch.isfinite(x).all())


def compose_finetune(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("entreg.configs", version_base="1.3"):
        return compose("finetune", overrides=["base_checkpoint=unused", "paths.output_dir=unused", *overrides])


@pytest.mark.parametrize("variant", [o for o in options("grpo") if o != "base"])
def test_every_grpo_config_fine_tunes(variant):
    """Each variant's config builds a GRPOModule that trains 2 iterations of an exact ring flow policy."""
    import lightning as L

    from entreg.modules.grpo import GRPOModule
    from tests.flow_toy import MixtureVelocity, ring_means

    small = ["grpo.steps=6", "grpo.active_steps=3", "grpo.iterations_per_epoch=2", "grpo.eval_every=2"]
    small += ["grpo.eval_samples=32", *(["grpo.shift_every=1", "grpo.window_size=2"] if variant == "mixgrpo" else [])]
    cfg = compose_finetune(f"grpo={variant}", *small)
    options_ = instantiate(cfg.grpo, _convert_="all")
    net = MixtureVelocity(ring_means(), 0.25, time_scale=1000.0)
    module = GRPOModule(net, instantiate(cfg.reward), (2,), eval_metrics=instantiate(cfg.eval_metrics), **options_)
    assert module.hparams.variant == cfg.grpo.variant
    start = net.logits.detach().clone()
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(module)
    assert module.iteration == 2 and not torch.equal(net.logits, start)
    assert set(module.evaluate()) >= {"reward", "path_kl", "in_target", "balance", "distance"}


def is_image_reward(option: str) -> bool:  # text-to-image rewards: tests/test_grpo_pipeline.py
    return "image_rewards" in (CONFIG_DIR / "reward" / f"{option}.yaml").read_text()


@pytest.mark.parametrize("reward", [o for o in options("reward") if not is_image_reward(o)])
def test_every_reward_config_scores_its_data(reward):
    from entreg.data import DigitsDataModule
    from tests.flow_toy import ring_means

    cfg = compose_finetune(f"reward={reward}")
    score = instantiate(cfg.reward, _convert_="all")
    if reward == "ring_region":
        points = ring_means().float()
        torch.testing.assert_close(score(points, None), torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0]), atol=1e-6, rtol=0)
        assert instantiate(cfg.eval_metrics)(points[:3])["balance"] == pytest.approx(1.0)
    else:
        dm = DigitsDataModule(size=8, scale="minus_one_one")
        dm.setup("test")
        x, y = dm.test_set.tensors
        assert float((score(x, y) > score(x, (y + 1) % 10)).float().mean()) > 0.9
