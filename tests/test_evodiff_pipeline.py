"""EVODiffScheduler in unmodified diffusers text-to-image pipelines (tiny random SD 1.x-class UNet, SD3 and FLUX
transformers, entreg.flow.tiny_pipeline): from_config of the shipped scheduler config, one model call per step on the
pipeline's own grid, and DPM-Solver++ 2M's samples with the EVODiff coefficients neutral."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

pytest.importorskip("transformers")

from entreg.diffusion.evodiff import EVODiffScheduler
from entreg.diffusion.pipelines import load_pipeline, pipeline_scheduler, read_prompts
from entreg.flow.tiny_pipeline import save_tiny_pipeline

NEUTRAL = {"balance": False, "adaptive_ratio": False, "corrector": False, "final_step": "dpmsolver"}
SIZE = {"sd": 8, "sd3": 16, "flux": 16}
FLOW_KEYS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}


@pytest.fixture(scope="module", params=["sd", "sd3", "flux"])
def pipe(request, tmp_path_factory):
    path = save_tiny_pipeline(tmp_path_factory.mktemp(request.param), request.param)
    pipeline = load_pipeline(path)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.kind = request.param
    return pipeline


def denoiser(pipe):
    return pipe.unet if pipe.kind == "sd" else pipe.transformer


def run(pipe, scheduler, steps: int) -> tuple[torch.Tensor, list[float]]:
    """The pipeline's latents after ``steps`` steps with ``scheduler`` and the timesteps the model was called at."""
    seen: list[float] = []

    def record(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        seen.append(float(torch.as_tensor(t).flatten()[0]))  # batched: one value for the CFG pair

    shipped, pipe.scheduler = pipe.scheduler, scheduler
    handle = denoiser(pipe).register_forward_pre_hook(record, with_kwargs=True)
    try:
        size = SIZE[pipe.kind]
        latents = pipe(
            "a photo of a red car", num_inference_steps=steps, height=size, width=size, guidance_scale=2.0,
            output_type="latent", generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
    finally:
        handle.remove()
        pipe.scheduler = shipped
    return latents, seen


@pytest.mark.parametrize("steps", [4, 7])
def test_from_config_runs_on_the_pipelines_own_grid_one_model_call_per_step(pipe, steps):
    shipped = pipe.scheduler.config
    _, expected = run(pipe, type(pipe.scheduler).from_config(shipped), steps)
    evodiff = EVODiffScheduler.from_config(shipped)
    if pipe.kind == "sd":  # SD 1.5's PNDM config: its betas and spacing, epsilon prediction; DPM-Solver's timesteps
        assert (evodiff.config.beta_schedule, evodiff.config.timestep_spacing) == ("scaled_linear", "leading")
        expected = run(pipe, DPMSolverMultistepScheduler.from_config(shipped), steps)[1]
    else:  # the FlowMatchEuler config: flow prediction with its shift (FLUX: dynamic shifting, mu from the pipeline)
        assert (evodiff.config.prediction_type, evodiff.config.flow_shift) == ("flow_prediction", 3.0)
        assert evodiff.config.use_dynamic_shifting == (pipe.kind == "flux")
    latents, seen = run(pipe, evodiff, steps)
    assert len(seen) == steps and seen == pytest.approx(expected, rel=1e-6)  # CFG batches both halves in one call
    assert torch.isfinite(latents).all()
    assert evodiff.sigmas[-1] == 0 and len(evodiff.sigmas) == steps + 1  # the last step is x = D, no extra level


def test_neutral_evodiff_in_the_pipeline_is_dpm_solver_2m(pipe):
    """With its coefficients neutral, EVODiff in the unmodified pipeline gives DPM-Solver++ 2M's latents on the same
    grid: SD's own config; SD3/FLUX with DPM-Solver's flow keys (FLUX: dynamic shifting, mu from the pipeline)."""
    config = dict(pipe.scheduler.config)
    if pipe.kind != "sd":
        config = {**FLOW_KEYS, "use_dynamic_shifting": pipe.kind == "flux"}
    steps = 6
    reference, seen_dpm = run(pipe, DPMSolverMultistepScheduler.from_config(config), steps)
    ours, seen = run(pipe, EVODiffScheduler.from_config(config, **NEUTRAL), steps)
    assert seen == seen_dpm and len(seen) == steps
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # final_step advice
        evodiff, _ = run(pipe, EVODiffScheduler.from_config(config), steps)
    assert (evodiff - reference).abs().max() > 1e-3  # the EVODiff coefficients do change the result


def test_flux_sigmas_are_the_levels_the_model_sees_and_a_full_grid_is_refused():
    """FLUX-class pipelines pass N sigmas with no final 0: EVODiff reads them as FlowMatchEuler does (shifted by mu,
    the 0 appended); a full grid ending in 0 is an error, not a silent extra step."""
    import numpy as np

    config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    sigmas = np.linspace(1.0, 1 / 5, 5)
    flow_match, evodiff = FlowMatchEulerDiscreteScheduler.from_config(config), EVODiffScheduler.from_config(config)
    for scheduler in (flow_match, evodiff):
        scheduler.set_timesteps(sigmas=sigmas, mu=0.8)
    torch.testing.assert_close(evodiff.timesteps, flow_match.timesteps)
    torch.testing.assert_close(evodiff.sigmas.float(), flow_match.sigmas)
    assert len(evodiff.timesteps) == 5 and evodiff.sigmas[-1] == 0
    with pytest.raises(ValueError, match="the final 0 is appended"):
        evodiff.set_timesteps(sigmas=np.linspace(1.0, 0.0, 6), mu=0.8)


def test_pipeline_scheduler_gives_dpm_solver_the_flow_keys_of_a_flow_pipeline_and_refuses_vp_only_ones(pipe):
    dpm = pipeline_scheduler(pipe, "diffusers.DPMSolverMultistepScheduler", solver_order=2)
    if pipe.kind == "sd":  # a VP pipeline: its own config
        assert (dpm.config.prediction_type, dpm.config.use_flow_sigmas) == ("epsilon", False)
        assert pipeline_scheduler(pipe, "diffusers.EulerDiscreteScheduler").config.beta_schedule == "scaled_linear"
        with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler samples flow-matching models"):
            pipeline_scheduler(pipe, "diffusers.FlowMatchEulerDiscreteScheduler")
        return
    assert (dpm.config.prediction_type, dpm.config.use_flow_sigmas, dpm.config.flow_shift) == (
        "flow_prediction", True, 3.0,
    )  # fmt: skip
    assert dpm.config.use_dynamic_shifting == (pipe.kind == "flux")
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no flow-matching mode"):
        pipeline_scheduler(pipe, "diffusers.EulerDiscreteScheduler")
    assert type(pipeline_scheduler(pipe)).__name__ == "FlowMatchEulerDiscreteScheduler"  # the pipeline's own


def test_read_prompts_from_a_file_or_a_list(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red car\n\n  a tree \n")
    assert read_prompts(path) == read_prompts(str(path)) == ["a red car", "a tree"]
    assert read_prompts(["a cat", " "]) == ["a cat"]
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts([])
    with pytest.raises(FileNotFoundError, match="one prompt a line"):
        read_prompts(tmp_path / "missing.txt")


def test_img2img_starts_where_flow_match_euler_does(pipe):
    """SD3's img2img pipeline (set_begin_index, scale_noise at the first kept timestep): EVODiff noises the image as
    FlowMatchEuler does, then calls the model at the same timesteps, once each."""
    if pipe.kind != "sd3":
        pytest.skip("the SD3 img2img pipeline")
    from diffusers import StableDiffusion3Img2ImgPipeline

    i2i = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
    config = pipe.scheduler.config
    flow_match, evodiff = FlowMatchEulerDiscreteScheduler.from_config(config), EVODiffScheduler.from_config(config)
    g = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for scheduler in (flow_match, evodiff):
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(4)
    t = flow_match.timesteps[4:5]
    torch.testing.assert_close(evodiff.scale_noise(sample, t, noise), flow_match.scale_noise(sample, t, noise))
    image = torch.rand(1, 3, 16, 16, generator=g)
    seen = {}
    for scheduler in (FlowMatchEulerDiscreteScheduler.from_config(config), EVODiffScheduler.from_config(config)):
        i2i.scheduler, calls = scheduler, []
        handle = i2i.transformer.register_forward_pre_hook(
            lambda module, args, kwargs, calls=calls: calls.append(float(kwargs["timestep"].flatten()[0])),
            with_kwargs=True,
        )
        try:
            latents = i2i(
                "a cat", image=image, strength=0.6, num_inference_steps=10, output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip
        finally:
            handle.remove()
        seen[type(scheduler).__name__] = calls
        assert torch.isfinite(latents).all()
    assert len(seen["EVODiffScheduler"]) == 6 and seen["EVODiffScheduler"] == seen["FlowMatchEulerDiscreteScheduler"]


SD_FAMILY = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


@pytest.mark.parametrize(
    ("cls_name", "config"),
    [
        ("PNDMScheduler", {**SD_FAMILY, "skip_prk_steps": True, "set_alpha_to_one": False}),  # SD 1.5
        ("DDIMScheduler", {**SD_FAMILY, "prediction_type": "v_prediction", "clip_sample": False}),  # SD 2.1 (768)
        ("EulerDiscreteScheduler", {**SD_FAMILY, "timestep_spacing": "leading", "interpolation_type": "linear"}),  # XL
        ("EulerAncestralDiscreteScheduler", SD_FAMILY),
        ("LMSDiscreteScheduler", SD_FAMILY),
        ("DPMSolverMultistepScheduler", {**SD_FAMILY, "use_karras_sigmas": True}),
        ("UniPCMultistepScheduler", SD_FAMILY),
    ],
)
def test_sd_family_configs_keep_their_noise_schedule_prediction_and_dpm_solvers_grid(cls_name, config):
    """The scheduler configs SD 1.x/2.x/XL pipelines ship: EVODiff keeps their betas, prediction type and spacing,
    and samples on DPM-Solver's grid for them (N timesteps ending at 0), as DPMSolverMultistepScheduler.from_config
    does."""
    import diffusers

    shipped = {**getattr(diffusers, cls_name)(**config).config, "_class_name": cls_name}
    evodiff, dpm = EVODiffScheduler.from_config(shipped), DPMSolverMultistepScheduler.from_config(shipped)
    for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "timestep_spacing", "steps_offset"):
        assert evodiff.config[key] == dpm.config[key] == config.get(key, dpm.config[key]), key  # the keys set
    for scheduler in (evodiff, dpm):
        scheduler.set_timesteps(12)
    assert torch.equal(evodiff.timesteps, dpm.timesteps) and len(evodiff.timesteps) == 12
    torch.testing.assert_close(evodiff.sigmas.float(), dpm.sigmas.float())
    assert evodiff.sigmas[-1] == 0 and evodiff.config.final_step == "auto"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"_class_name": "LCMScheduler"}, "consistency-distilled"),
        ({"_class_name": "TCDScheduler"}, "consistency-distilled"),
        ({"_class_name": "EDMEulerScheduler"}, "EDM-preconditioned"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "invert_sigmas": True}, "invert_sigmas"),
        ({"_class_name": "IPNDMScheduler"}, "EVODiffScheduler\\(\\*\\*keys\\) builds one by hand"),
    ],
)
def test_configs_it_cannot_serve_are_refused_with_the_reason(config, message):
    with pytest.raises(ValueError, match=message):
        EVODiffScheduler.from_config(config)


@pytest.mark.parametrize(
    ("cls_name", "options"),
    [
        ("DEISMultistepScheduler", {}),  # algorithm_type "deis"
        ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
        ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
        ("SASolverScheduler", {}),
        ("UniPCMultistepScheduler", {"solver_order": 3}),
    ],
)
def test_a_config_read_from_disk_with_another_solvers_keys_becomes_evodiffs(tmp_path, cls_name, options):
    """A pipeline directory's scheduler_config.json holds every key (in memory diffusers leaves the defaults out):
    EVODiff takes the noise schedule and grid from it, not the other solver's order or algorithm."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **options).save_config(tmp_path)
    evodiff = EVODiffScheduler.from_config(cls.load_config(tmp_path))
    assert (evodiff.config.solver_order, evodiff.config.algorithm_type) == (2, "dpmsolver++")
    assert evodiff.config.beta_schedule == "scaled_linear" and evodiff.config.final_step == "auto"
    evodiff.set_timesteps(6)
    assert len(evodiff.timesteps) == 6 and evodiff.sigmas[-1] == 0
