"""Text-to-image sampling with a local diffusers pipeline and any scheduler (``entreg-sample pipeline=<dir>``).

:func:`load_pipeline` loads a pipeline directory (components saved as ``null``, e.g. SD3 without its T5 encoder, are
passed as None); :func:`pipeline_scheduler` builds a scheduler from the pipeline's shipped config: EVODiff through its
``from_config`` (:func:`entreg.diffusion.evodiff.evodiff_config`), DPM-Solver/UniPC-style schedulers on a
flow-matching pipeline with their flow keys (``use_flow_sigmas``, ``flow_prediction``, the pipeline's shift and
dynamic shifting), anything else by ``from_config``; :func:`sample_pipeline` draws one image per prompt and seed and
counts the model calls of each.

Example:
    >>> import tempfile
    >>> from entreg.flow.tiny_pipeline import save_tiny_pipeline
    >>> pipe = load_pipeline(save_tiny_pipeline(tempfile.mkdtemp(), "sd3"))
    >>> scheduler = pipeline_scheduler(pipe, "entreg.diffusion.evodiff.EVODiffScheduler")
    >>> images, records = sample_pipeline(pipe, ["a red car"], [0, 1], 4, scheduler=scheduler, height=16, width=16)
    >>> images.shape, [r["nfe"] for r in records]
    (torch.Size([2, 3, 16, 16]), [4, 4])
"""

from __future__ import annotations

import inspect
import pydoc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from entreg.diffusion.evodiff import FLOW_MATCH_SCHEDULERS, is_flow_matching_config
from entreg.nn.pretrained import load_pipeline

__all__ = ["load_pipeline", "pipeline_scheduler", "read_prompts", "sample_pipeline", "scheduler_class"]

# flow-matching schedulers that take a FlowMatchEuler config as it is (EVODiff maps it in its from_config)
FLOW_NATIVE = FLOW_MATCH_SCHEDULERS | {"EVODiffScheduler"}


def scheduler_class(path: str | type) -> type:
    """The scheduler class ``path`` names (e.g. ``diffusers.UniPCMultistepScheduler``), or a ValueError."""
    cls = path if isinstance(path, type) else pydoc.locate(path)
    if not isinstance(cls, type):
        raise ValueError(f"a scheduler is a class or its path such as diffusers.UniPCMultistepScheduler, got {path!r}")
    return cls


def pipeline_scheduler(pipeline: Any, scheduler: str | type | None = None, **options: Any) -> Any:
    """A scheduler of class ``scheduler`` (a class or its path; None: the pipeline's own class) built from the
    pipeline's scheduler config, ``options`` overriding it. On a flow-matching pipeline (SD3, FLUX, ...) a scheduler
    with DPM-Solver's flow keys (DPM-Solver, UniPC, DEIS, ...) gets ``use_flow_sigmas=True``,
    ``prediction_type="flow_prediction"``, ``flow_shift`` = the pipeline's shift and its ``use_dynamic_shifting``;
    one without them (DDIM, Euler, ...) is a ValueError. The same holds for a pipeline whose scheduler was already
    set to a flow-prediction one (e.g. EVODiff from a flow config). A flow-matching scheduler on a diffusion (VP)
    pipeline is a ValueError too."""
    config = {**pipeline.scheduler.config, "_class_name": type(pipeline.scheduler).__name__}
    cls = type(pipeline.scheduler) if scheduler is None else scheduler_class(scheduler)
    flow_model = is_flow_matching_config(config) or config.get("prediction_type") == "flow_prediction"
    if not flow_model and cls.__name__ in FLOW_MATCH_SCHEDULERS:
        raise ValueError(
            f"{cls.__name__} samples flow-matching models and this pipeline's model is a diffusion (VP) model "
            f"({config['_class_name']}): use a DDPM-family scheduler, e.g. entreg.diffusion.evodiff.EVODiffScheduler"
        )
    if flow_model and cls.__name__ not in FLOW_NATIVE:
        accepted = inspect.signature(cls.__init__).parameters
        if "use_flow_sigmas" not in accepted:
            raise ValueError(
                f"{cls.__name__} has no flow-matching mode and this pipeline's model predicts flow velocities "
                f"({config['_class_name']}): use entreg.diffusion.evodiff.EVODiffScheduler, "
                "diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler or the pipeline's own"
            )
        flow = {
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "flow_shift": float(config.get("shift", config.get("flow_shift", 1.0))),
        }
        if "use_dynamic_shifting" in accepted:
            flow["use_dynamic_shifting"] = bool(config.get("use_dynamic_shifting", False))
        config = {key: value for key, value in config.items() if key != "_class_name"} | flow
    return cls.from_config(config, **options)


def read_prompts(prompts: str | Path | Sequence[str]) -> list[str]:
    """The prompts of a text file (one per line, blank lines skipped) or a list of prompts."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts={prompts}: no such file (a text file, one prompt a line, or a list)")
        prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [str(p) for p in prompts if str(p).strip()]
    if not prompts:
        raise ValueError("no prompts: give a text file with one prompt a line, or a list such as '[a red car]'")
    return prompts


def _denoiser(pipeline: Any) -> torch.nn.Module:
    for name in ("transformer", "unet", "prior"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(pipeline).__name__} has no transformer or unet to count model calls of")


def sample_pipeline(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    scheduler: Any = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    **call_options: Any,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """One image per prompt and seed (prompt-major), each by one pipeline call with ``torch.Generator`` seeded by its
    seed on the CPU (the same image for a seed on any device), by ``scheduler`` when given (the pipeline's own
    scheduler is put back afterwards).

    Returns (images (N, 3, H, W) float32 in [0, 1] on the CPU, one record per image: prompt, seed, seconds, nfe =
    the calls of the pipeline's transformer/UNet; classifier-free guidance batches both branches in one call).
    ``guidance_scale``, ``height``, ``width``: None keeps the pipeline's defaults; ``call_options`` go to the
    pipeline call."""
    shipped = pipeline.scheduler
    if scheduler is not None:
        pipeline.scheduler = scheduler
    options = {"guidance_scale": guidance_scale, "height": height, "width": width}
    options = {k: v for k, v in options.items() if v is not None} | call_options
    calls = [0]

    def count(module, args, kwargs):
        calls[0] += 1

    handle = _denoiser(pipeline).register_forward_pre_hook(count, with_kwargs=True)
    images, records = [], []
    try:
        for prompt in prompts:
            for seed in seeds:
                calls[0] = 0
                start = time.perf_counter()
                out = pipeline(
                    prompt, num_inference_steps=num_inference_steps, output_type="pt",
                    generator=torch.Generator().manual_seed(int(seed)), **options,
                )  # fmt: skip
                seconds = time.perf_counter() - start
                images.append(out.images.float().cpu())
                records.append({"prompt": prompt, "seed": int(seed), "seconds": seconds, "nfe": calls[0]})
    finally:
        handle.remove()
        pipeline.scheduler = shipped
    return torch.cat(images), records
