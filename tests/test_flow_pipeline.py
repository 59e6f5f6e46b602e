"""Diffusers flow pipelines as GRPO policies (tiny random SD3 and FLUX pipelines saved and loaded here): the SDE and
CPS steps against Flow-GRPO's formulas on the pipeline's own sigma grid, a = 0 and the ODE against the pipeline's
own sampler, prompts and image rewards."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from entreg.flow.image_rewards import (
    ClassifierImageReward,
    CLIPScore,
    JPEGCompressibility,
    WeightedReward,
)
from entreg.flow.pipeline import PipelinePolicy, load_flow_pipeline
from entreg.flow.plans import flow_grpo_plan, ode_plan
from entreg.flow.prompts import load_prompts
from entreg.flow.rollout import rollout
from entreg.flow.sde import get_step_type, sde_mean
from entreg.flow.tiny_pipeline import save_tiny_pipeline


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd3"), "sd3", shift=3.0)


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("flux"), "flux")


def flow_grpo_reference(sigmas, i, x, v, noise, a, kind):
    """Flow-GRPO's sde_step_with_logprob (yifan123/flow_grpo, sd3_sde_with_logprob.py, sde_type 'sde' and 'cps'),
    written out on the scheduler's float32 sigmas: (next sample, log-probability, mean, std)."""
    sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1].item()
    dt = sigma_prev - sigma
    if kind == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_dev_t * torch.sqrt(-1 * dt)
        sample = mean + std * noise
        log_prob = (
            -((sample - mean) ** 2) / (2 * std**2)
            - torch.log(std)
            - torch.log(torch.sqrt(2 * torch.tensor(math.pi, dtype=torch.float64)))
        )
    else:
        std = sigma_prev * math.sin(a * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_prev) + (x + v * (1 - sigma)) * torch.sqrt(sigma_prev**2 - std**2)
        sample = mean + std * noise
        log_prob = -((sample - mean) ** 2)
    return sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_steps_equal_flow_grpos_formulas_on_the_pipelines_own_grid(sd3_path, kind):
    policy = PipelinePolicy(load_flow_pipeline(sd3_path), height=16, width=16, guidance_scale=1.0)
    grid = policy.grid(6)
    scheduler = policy.pipeline.scheduler
    scheduler.set_timesteps(6)
    assert grid == scheduler.sigmas.tolist() and grid[0] == 1.0 and grid[-1] == 0.0  # the pipeline's own sigmas
    g = torch.Generator().manual_seed(0)
    step = get_step_type(kind)
    for i in range(6):
        x, v, noise = (torch.randn(3, *policy.latent_shape, generator=g, dtype=torch.float64) for _ in range(3))
        sigmas = scheduler.sigmas.double()
        sample, log_prob, mean, std = flow_grpo_reference(sigmas, i, x, v, noise, 0.7, kind)
        ours_mean, ours_std = step.mean_std(x, v, grid[i], grid[i + 1], 0.7, grid[1])
        torch.testing.assert_close(ours_mean, mean, rtol=1e-12, atol=1e-12)
        assert ours_std == pytest.approx(float(std), rel=1e-12, abs=1e-15)
        ours_sample = ours_mean + ours_std * noise
        torch.testing.assert_close(
            step.log_prob(ours_sample, ours_mean, ours_std, "mean"), log_prob, rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(ours_sample, sample, rtol=1e-12, atol=1e-12)


def test_a_zero_is_the_schedulers_euler_step_bit_for_bit(sd3_path):
    policy = PipelinePolicy(load_flow_pipeline(sd3_path), height=16, width=16, guidance_scale=1.0)
    grid, scheduler = policy.grid(5), policy.pipeline.scheduler
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(1)
    for i, timestep in enumerate(scheduler.timesteps):
        x, v = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
        scheduler._step_index = i
        expected = scheduler.step(v, timestep, x, return_dict=False)[0]
        assert torch.equal(sde_mean(x, v, grid[i], grid[i + 1], sigma=0.0), expected)
        assert torch.equal(x + (grid[i + 1] - grid[i]) * v, expected)  # the rollout's ODE step


@pytest.mark.parametrize("kind, guidance", [("sd3", 4.5), ("sd3", 1.0), ("flux", 1.0)])
def test_ode_rollouts_equal_the_pipelines_own_sampling(sd3_path, flux_path, kind, guidance):
    """Same noise, same NFE: entreg's ODE rollout (CFG in one batched call, as the pipeline) gives the latents of
    the pipeline's ``__call__``."""
    pipeline = load_flow_pipeline(sd3_path if kind == "sd3" else flux_path)
    policy = PipelinePolicy(pipeline, height=16, width=16, guidance_scale=guidance, max_sequence_length=8)
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    embeds = policy.embeddings(["a red car"], noise.device)
    ours = rollout(lambda x, t, c: policy.velocity(x, t, embeds), noise, policy.grid(4), ode_plan(4), 1.0).sample
    with torch.no_grad():
        theirs = pipeline(
            "a red car", num_inference_steps=4, height=16, width=16, guidance_scale=guidance, latents=noise.clone(),
            output_type="latent", max_sequence_length=8,
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    images = policy.decode(ours)
    assert images.shape == (1, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_sde_rollout_on_the_pipeline_grid_has_finite_log_probs_and_embeddings_are_cached(sd3_path):
    policy = PipelinePolicy(
        load_flow_pipeline(sd3_path), height=16, width=16, guidance_scale=4.5, max_sequence_length=8
    )
    embeds = policy.embeddings(["a cat", "a dog", "a cat"], torch.device("cpu"))
    assert set(policy.cache) == {"a cat", "a dog"} and embeds["encoder_hidden_states"].shape[0] == 3
    torch.testing.assert_close(embeds["pooled_projections"][0], embeds["pooled_projections"][2])
    out = rollout(lambda x, t, c: policy.velocity(x, t, embeds), torch.randn(3, 4, 16, 16), policy.grid(3),
                  flow_grpo_plan(3), 0.7)  # fmt: skip
    assert len(out.transitions) == 3 and all(torch.isfinite(tr.log_prob).all() for tr in out.transitions)
    assert "" in policy.cache  # the negative prompt, encoded once


def test_refuses_what_is_not_a_flow_matching_pipeline(tmp_path, sd3_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    blocks = {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")}
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), norm_num_groups=4, **blocks
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="not a flow-matching pipeline: its scheduler is DDPMScheduler"):
        load_flow_pipeline(tmp_path / "ddpm")
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        load_flow_pipeline(tmp_path)
    with pytest.raises(ValueError, match="multiples of 2"):
        PipelinePolicy(load_flow_pipeline(sd3_path), height=15, width=16)


def test_prompts_from_text_files_and_table_columns(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "a tree"}\n{"text": "a house"}\n')
    assert load_prompts(tmp_path / "p.jsonl", column="text") == ["a tree", "a house"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(tmp_path / "p.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def test_jpeg_classifier_and_weighted_rewards():
    g = torch.Generator().manual_seed(0)
    flat, noisy = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=g)
    images = torch.cat([flat, noisy])
    compress, incompress = JPEGCompressibility()(images, ["", ""]), JPEGCompressibility(True)(images, ["", ""])
    assert compress[0] > compress[1] and torch.equal(incompress, -compress)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    reward = ClassifierImageReward(classifier, target=2)
    torch.testing.assert_close(reward(images, ["", ""]), classifier(images).log_softmax(-1)[:, 2])
    with pytest.raises(ValueError, match="no target class"):
        ClassifierImageReward(classifier, target={"a": 0})(images, ["a", "b"])
    combined = WeightedReward({"jpeg": JPEGCompressibility(), "cls": reward}, {"jpeg": 2.0, "cls": -1.0})
    torch.testing.assert_close(combined(images, ["", ""]), 2 * compress - reward(images, ["", ""]))
    with pytest.raises(ValueError, match="shape"):
        WeightedReward({"bad": lambda x, p: torch.zeros(3)})(images, ["", ""])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        JPEGCompressibility()(torch.zeros(2, 32, 32), ["", ""])


def test_clip_score_loads_local_weights_and_says_when_they_are_missing(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from entreg.flow.tiny_pipeline import _clip_tokenizer

    tokenizer = _clip_tokenizer(tmp_path / "vocab")
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    reward = CLIPScore(tmp_path / "clip")
    score = reward(torch.rand(2, 3, 16, 16), ["a cat", "a red car"])
    assert score.shape == (2,) and bool(score.abs().max() <= 1.0 + 1e-5)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CLIPScore(tmp_path / "no_such_model")
