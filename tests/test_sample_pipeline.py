"""entreg-sample pipeline=<dir>: a tiny random SD 1.x-class pipeline (entreg.flow.tiny_pipeline) sampled from the CLI's
config with any scheduler; images, grid, TensorBoard and metrics.json written; clear errors before loading."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from entreg.diffusion.pipelines import load_pipeline, pipeline_scheduler, sample_pipeline
from entreg.flow.tiny_pipeline import save_tiny_pipeline


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd"), "sd")


def compose_sample(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("entreg.configs", version_base="1.3"):
        return compose("sample", overrides=list(overrides))


def test_entreg_sample_pipeline_writes_images_grid_tensorboard_and_metrics(sd_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision.io import read_image

    from entreg.cli import sample

    (tmp_path / "prompts.txt").write_text("a red car\na tree\n")
    run = tmp_path / "run"
    cfg = compose_sample(
        f"pipeline={sd_path}", f"prompts={tmp_path / 'prompts.txt'}", "sampler=evodiff", "num_inference_steps=3",
        "seeds=[0,5]", "height=8", "width=8", "guidance_scale=3.0", f"paths.output_dir={run}",
    )  # fmt: skip
    metrics = sample(cfg)
    assert (metrics["images"], metrics["nfe"], metrics["num_inference_steps"]) == (4, 3, 3)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["scheduler"] == "EVODiffScheduler" and saved["scheduler_config"]["beta_schedule"] == "scaled_linear"
    files = [r["file"] for r in saved["per_image"]]
    assert files == ["images/000_0.png", "images/000_5.png", "images/001_0.png", "images/001_5.png"]
    assert all(r["seconds"] > 0 and r["nfe"] == 3 for r in saved["per_image"])
    # the image of prompt 1, seed 5 is the pipeline's own output for that seed (8-bit PNG)
    pipe = load_pipeline(sd_path)
    scheduler = pipeline_scheduler(pipe, "entreg.diffusion.evodiff.EVODiffScheduler")
    expected, _ = sample_pipeline(pipe, ["a tree"], [5], 3, scheduler, guidance_scale=3.0, height=8, width=8)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the pipeline's own scheduler is put back
    written = read_image(str(run / files[3])).float() / 255
    assert (written - expected[0]).abs().max() <= 1 / 255 + 1e-6
    assert (run / "samples.png").is_file()
    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "sample/samples" in events.Tags()["images"] and "sample/nfe" in events.Tags()["scalars"]


def test_entreg_sample_pipeline_takes_a_prompt_list_and_the_pipelines_own_scheduler(sd_path, tmp_path):
    from entreg.cli import sample

    cfg = compose_sample(
        f"pipeline={sd_path}", "prompts=[a cat]", "sampler=pipeline", "num_inference_steps=2", "height=8",
        "width=8", f"paths.output_dir={tmp_path}", "logger=none", "seeds=2",
    )  # fmt: skip
    assert sample(cfg)["images"] == 2  # seeds=2: seeds 0 and 1
    assert json.loads((tmp_path / "metrics.json").read_text())["scheduler"] == "PNDMScheduler"


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["prompts=null"], ValueError, "needs prompts="),
        (["seeds=[]"], ValueError, "seeds must be a count >= 1"),
        (["seeds=0"], ValueError, "seeds must be a count >= 1"),
        (["seeds=[1.5]"], ValueError, "or a list of integers"),
        (["num_inference_steps=0"], ValueError, "num_inference_steps must be an integer >= 1"),
        (["pipeline=/nonexistent/dir"], FileNotFoundError, "not a diffusers pipeline directory"),
        (["prompts=/nonexistent/prompts.txt"], FileNotFoundError, "one prompt a line"),
        (["sampler.scheduler=diffusers.NoSuchScheduler"], ValueError, "a scheduler is a class or its path"),
        # the scheduler's name is checked before the (missing) pipeline is loaded
        (["sampler.scheduler=NoSuch", "pipeline=/nonexistent/dir"], ValueError, "a scheduler is a class or its path"),
    ],
)
def test_entreg_sample_pipeline_errors_name_the_key(sd_path, tmp_path, overrides, error, message):
    from entreg.cli import sample

    base = [f"pipeline={sd_path}", "prompts=[a cat]", f"paths.output_dir={tmp_path}", "logger=none"]
    with pytest.raises(error, match=message):
        sample(compose_sample(*base, *overrides))


def test_checkpoint_mode_refuses_the_pipelines_own_scheduler(tmp_path):
    from entreg.cli import sample

    with pytest.raises(ValueError, match="needs pipeline="):
        sample(compose_sample("ckpt_path=unused", "sampler=pipeline", f"paths.output_dir={tmp_path}"))


def test_a_pipeline_saved_in_float16_loads_with_every_component_in_one_dtype(sd_path, tmp_path):
    """diffusers loads the UNet in float32 but transformers keeps the text encoder's saved float16: they would not
    mix. load_pipeline gives every component torch_dtype (float32 by default)."""
    import torch

    load_pipeline(sd_path).to(torch.float16).save_pretrained(tmp_path / "fp16")
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        pipe = load_pipeline(tmp_path / "fp16", dtype)
        assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {expected}
    images, records = sample_pipeline(load_pipeline(tmp_path / "fp16"), ["a cat"], [0], 2, height=8, width=8)
    assert images.shape == (1, 3, 8, 8) and bool(torch.isfinite(images).all()) and len(records) == 1
