"""GRPOPipelineModule on tiny random SD3 pipelines saved and loaded here: every variant with LoRA, the ratio of the
sampling policy, CFG, LoRA round trip and merged export, exact resume, 2 ranks = 1 rank, bad input."""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from entreg.flow.image_rewards import JPEGCompressibility
from entreg.flow.pipeline import load_flow_pipeline
from entreg.flow.tiny_pipeline import save_tiny_pipeline
from entreg.flow.variants import GRPO_VARIANTS
from entreg.modules.grpo_pipeline import GRPOPipelineModule

PROMPTS = ["a cat", "a dog", "a red car"]


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd3"), "sd3", shift=3.0)


def make(path, **kwargs) -> GRPOPipelineModule:
    options = {
        "reward": JPEGCompressibility(),
        "prompt_source": PROMPTS,
        "height": 16,
        "width": 16,
        "variant": "flow_grpo",
        "steps": 3,
        "active_steps": 3,
        "group_size": 4,
        "prompts": 2,
        "lora_rank": 4,
        "lora_alpha": 8,
        "guidance_scale": 1.0,
        "max_sequence_length": 8,
        "eval_every": 0,
        "eval_per_prompt": 2,
        "iterations_per_epoch": 1,
        "window_size": 2,
        "shift_every": 1,
        "optimizer": partial(torch.optim.AdamW, lr=1e-2),
        **kwargs,
    }
    return GRPOPipelineModule(str(path), **options)


def fit(module, epochs: int = 1, ckpt_path=None, **trainer) -> L.Trainer:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, **trainer}  # fmt: skip
    t = L.Trainer(max_epochs=epochs, **options)
    t.fit(module, ckpt_path=ckpt_path)
    return t


def lora_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.transformer.named_parameters() if p.requires_grad}


def base_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.transformer.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("variant", sorted(GRPO_VARIANTS))
def test_every_registered_variant_trains_the_adapter_only(sd3_path, variant):
    module = make(sd3_path, variant=variant)
    base, adapter = base_state(module), lora_state(module)
    assert adapter and all("lora_" in n for n in adapter)
    fit(module)
    assert module.iteration == 1 and module.cost["reward_calls"] > 0 and module.cost["train_forward_backwards"] > 0
    assert any(not torch.equal(adapter[n], p) for n, p in lora_state(module).items())
    assert all(torch.equal(base[n], p) for n, p in base_state(module).items())


@pytest.mark.parametrize("guidance, step_type", [(4.5, "sde"), (1.0, "cps")])
def test_the_training_forward_reproduces_the_rollouts_log_probs(sd3_path, guidance, step_type):
    """The ratio of the sampling policy is 1 (to 1e-6) with and without CFG: the training forward is the
    rollout's (with the unconditional branch in the same batched call), so a clip range of 1e-4 is meaningful."""
    module = make(sd3_path, guidance_scale=guidance, step_type=step_type, variant="egrpo")
    module.eval()
    collected = module._collect()
    for unit in collected.units:
        for tr in unit.transitions:
            shared = unit.shared if tr.segment.start == unit.branch else 1
            log_prob, _ = module._log_prob(False, tr, unit.cond, shared, grad=True)
            torch.testing.assert_close(log_prob.detach(), tr.log_prob, rtol=0, atol=1e-6)


def test_the_kl_reference_is_the_transformer_without_its_adapter(sd3_path):
    module = make(sd3_path, kl_coef=0.1, optimizer=partial(torch.optim.AdamW, lr=5e-2))
    fit(module)
    x, t = torch.randn(2, 4, 16, 16), torch.full((2,), 0.8)
    cond = torch.tensor([0, 1])
    with torch.no_grad():
        policy, reference = module.policy()(x, t, cond), module.policy(reference=True)(x, t, cond)
        fresh = load_flow_pipeline(sd3_path).transformer
        expected = module.flow.velocity(x, t, module.flow.embeddings(["a cat", "a dog"], x.device), fresh)
    assert not torch.allclose(policy, reference)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert module.evaluate()["path_kl"] > 0


def test_lora_round_trip_and_merged_export_reproduce_the_modules_samples(sd3_path, tmp_path):
    module = make(sd3_path, guidance_scale=4.5, optimizer=partial(torch.optim.AdamW, lr=5e-2), ema_decay=0.5)
    fit(module)
    ours = module.sample(["a red car"], seed=3)  # with the EMA weights, which save_lora writes
    module.save_lora(tmp_path / "lora")
    noise = torch.randn(1, *module.sample_shape, generator=torch.Generator().manual_seed(3))
    for path, lora in ((sd3_path, tmp_path / "lora"), (module.export_pipeline(tmp_path / "merged"), None)):
        pipeline = load_flow_pipeline(path)
        if lora is not None:
            pipeline.load_lora_weights(str(lora))
        with torch.no_grad():
            images = pipeline("a red car", num_inference_steps=3, height=16, width=16, guidance_scale=4.5,
                              latents=noise.clone(), output_type="pt", max_sequence_length=8).images  # fmt: skip
        torch.testing.assert_close(images, ours, rtol=0, atol=1e-5)
    plain = load_flow_pipeline(sd3_path)
    with torch.no_grad():
        untouched = plain("a red car", num_inference_steps=3, height=16, width=16, guidance_scale=4.5,
                          latents=noise.clone(), output_type="pt", max_sequence_length=8).images  # fmt: skip
    assert not torch.allclose(untouched, ours, atol=1e-4)  # the adapter changed the samples


def test_resume_restores_adapter_optimizer_ema_and_rollouts_exactly(sd3_path, tmp_path):
    straight = make(sd3_path, ema_decay=0.9, iterations_per_epoch=2)
    fit(straight, epochs=2)
    first = make(sd3_path, ema_decay=0.9, iterations_per_epoch=2)
    trainer = fit(first, epochs=1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert all("lora_" in k for k in saved["state_dict"])  # the adapter only, not the frozen transformer
    resumed = make(sd3_path, ema_decay=0.9, iterations_per_epoch=2)
    fit(resumed, epochs=2, ckpt_path=str(tmp_path / "one.ckpt"))
    assert resumed.iteration == straight.iteration == 4 and resumed.cost == straight.cost
    for name, value in lora_state(straight).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)
    for a, b in zip(resumed.ema, straight.ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class ExpectAdapter(L.Callback):
    def __init__(self, expected: dict[str, torch.Tensor]) -> None:
        self.expected = expected

    def on_train_end(self, trainer, pl_module) -> None:
        assert trainer.world_size == 2
        for name, value in lora_state(pl_module).items():
            torch.testing.assert_close(value, self.expected[name], rtol=0, atol=1e-5)


def test_two_ranks_equal_one_rank_on_the_same_global_groups(sd3_path):
    one = make(sd3_path, variant="egrpo", iterations_per_epoch=2)
    fit(one)
    two = make(sd3_path, variant="egrpo", iterations_per_epoch=2)
    fit(two, accelerator="cpu", devices=2, strategy="ddp_fork", callbacks=[ExpectAdapter(lora_state(one))])


def test_full_fine_tuning_keeps_a_frozen_reference(sd3_path, tmp_path):
    module = make(sd3_path, lora_rank=None, kl_coef=0.1, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    reference = {n: p.detach().clone() for n, p in module.reference[0].named_parameters()}
    fit(module)
    assert all(torch.equal(reference[n], p) for n, p in module.reference[0].named_parameters())
    assert any(not torch.equal(reference[n], p) for n, p in module.transformer.named_parameters())
    with pytest.raises(ValueError, match="needs a LoRA run"):
        module.save_lora(tmp_path / "lora")


def test_bad_input_raises_or_skips_without_touching_the_weights(sd3_path, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        make(sd3_path, prompt_source=tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="group_size >= 2"):
        make(sd3_path, group_size=1)
    with pytest.raises(ValueError, match="variant must be one of"):
        make(sd3_path, variant="ppo")
    module = make(sd3_path, reward=lambda images, prompts: torch.zeros(len(images), 2))
    adapter = lora_state(module)
    with pytest.raises(ValueError, match="one value per sample"):
        fit(module)
    assert all(torch.equal(adapter[n], p) for n, p in lora_state(module).items())
    module = make(sd3_path, reward=lambda images, prompts: torch.full((len(images),), float("nan")))
    with pytest.warns(UserWarning, match="non-finite rewards"):
        fit(module)
    assert module.iteration == 1 and all(torch.equal(adapter[n], p) for n, p in lora_state(module).items())


def test_tensorboard_gets_rewards_diversity_entropies_and_image_grids(sd3_path, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = make(sd3_path, variant="egrpo", eval_every=1)
    fit(module, logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    tags = ["train/reward", "train/reward_std", "train/reward_group_std", "train/diversity", "train/clip_fraction"]
    tags += ["train/step_entropy", "eval/reward", "eval/path_kl", "eval/diversity", "cost/sample_forwards"]
    for tag in tags:
        assert tag in scalars, (tag, sorted(scalars))
    assert "eval/samples" in events.Tags()["images"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_short_lora_run_raises_the_jpeg_reward(sd3_path, seed):
    """Flow-GRPO with LoRA (also on the output projection: the tiny random transformer's attention alone barely
    moves the JPEG size) and the JPEG-compressibility reward: 15 iterations of 2 prompts x 8 images raise the reward of
    ODE samples of the evaluation prompts from fixed noise (about 12 s a seed on one core)."""
    from entreg.flow.lora import ATTENTION_TARGETS

    targets, optimizer = (*ATTENTION_TARGETS, "proj_out"), partial(torch.optim.AdamW, lr=0.1)
    module = make(sd3_path, group_size=8, iterations_per_epoch=15, seed=seed, eval_per_prompt=4, lora_targets=targets,
                  optimizer=optimizer)  # fmt: skip
    before = module.evaluate()["reward"]
    fit(module)
    after = module.evaluate()["reward"]
    assert after > before + 1e-3, (before, after)


@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_entreg_finetune_pipeline_route_runs_and_exports_the_adapter(sd3_path, tmp_path, reward):
    """entreg-finetune pipeline=<dir> prompts=<file> reward=... grpo=egrpo_reference t2i=sd3, shrunk to the tiny
    pipeline: it trains, writes metrics.json, the adapter (which an unmodified pipeline loads) and the merged
    pipeline; t2i=flux composes FLUX's settings."""
    from hydra import compose, initialize_config_module

    from entreg.cli import finetune
    from tests.conftest import FAST_TRAINER

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    tiny = ["t2i.height=16", "t2i.width=16", "t2i.lora_rank=4", "t2i.lora_alpha=8", "t2i.max_sequence_length=8",
            "t2i.autocast=false", "t2i.torch_dtype=null", "t2i.gradient_checkpointing=false", "grpo.steps=3",
            "grpo.active_steps=3", "grpo.group_size=2", "grpo.prompts=1", "grpo.iterations_per_epoch=1",
            "grpo.eval_every=1", "t2i.eval_per_prompt=1"]  # fmt: skip
    overrides = [f"pipeline={sd3_path}", f"prompts={tmp_path / 'prompts.txt'}", f"reward={reward}",
                 "grpo=egrpo_reference", f"paths.output_dir={tmp_path / 'run'}", "export_pipeline=true", *FAST_TRAINER,
                 *tiny]  # fmt: skip
    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("finetune", overrides=overrides)
        flux = compose("finetune", overrides=[f"pipeline={sd3_path}", "t2i=flux", "grpo=egrpo_reference"])
    metrics = finetune(cfg)
    assert set(metrics) >= {"eval/reward", "eval/path_kl", "eval/diversity"}
    assert (tmp_path / "run" / "metrics.json").is_file()
    pipeline = load_flow_pipeline(tmp_path / "run" / "pipeline")
    pipeline.load_lora_weights(str(tmp_path / "run" / "lora"))  # loads into an unmodified pipeline
    assert flux.t2i.guidance_scale == 1.0 and flux.t2i.lora_alpha == 128 and "ff.net.2" in flux.t2i.lora_targets
    assert (flux.grpo.adv_std, flux.grpo.adv_eps, flux.grpo.tau) == ("unbiased", 1e-8, 2.4)
    bad = cfg.copy()
    bad.pipeline = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline"):
        finetune(bad)


@pytest.mark.parametrize("reward", ["clip_score", "pickscore", "aesthetic", "hpsv2", "clip_jpeg"])
def test_reward_configs_of_local_models_say_which_path_is_missing(reward, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("finetune", overrides=[f"reward={reward}", "pipeline=unused"])
    with pytest.raises((MissingMandatoryValue, InstantiationException), match="Missing mandatory value: reward"):
        instantiate(cfg.reward)


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("flux"), "flux")


def test_a_flux_pipeline_trains_its_lora_with_packed_latents(flux_path):
    module = make(flux_path, variant="egrpo")
    assert module.sample_shape == (64, 4)  # FLUX packs 2x2 latent patches into tokens
    adapter = lora_state(module)
    fit(module)
    assert any(not torch.equal(adapter[n], p) for n, p in lora_state(module).items())
    assert module.sample(["a cat"]).shape == (1, 3, 16, 16)


def test_gradient_checkpointing_gives_the_same_update_and_autocast_keeps_float32_log_probs(sd3_path):
    plain = make(sd3_path, variant="egrpo")
    fit(plain)
    checkpointed = make(sd3_path, variant="egrpo", gradient_checkpointing=True)
    fit(checkpointed)
    for name, value in lora_state(plain).items():
        torch.testing.assert_close(lora_state(checkpointed)[name], value, rtol=0, atol=1e-6)
    bf16 = make(sd3_path, variant="egrpo", autocast=True)
    bf16.eval()
    collected = bf16._collect()
    assert all(tr.log_prob.dtype == torch.float32 for unit in collected.units for tr in unit.transitions)
    fit(bf16)
    assert bf16.iteration == 1
