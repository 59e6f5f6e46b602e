"""Test settings: one thread per process (CI has 2 cores), offline hub, tiny Hydra runs."""

from __future__ import annotations

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)
# pytest-xdist's workers ignore SIGINT (and so would every subprocess they start); the interrupt tests need the
# handler a Python process starts with
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
settings.register_profile("entreg", max_examples=60, deadline=None)
settings.load_profile("entreg")

FAST_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks=none",
    "logger=none",
]


@pytest.fixture
def compose_train(tmp_path):
    """Compose ``configs/train.yaml`` with overrides, as ``entreg-train`` would, writing under tmp_path."""
    from hydra import compose, initialize_config_module

    def _compose(*overrides: str, fast: bool = True):
        base = [*(FAST_TRAINER if fast else []), f"paths.output_dir={tmp_path}"]
        with initialize_config_module("entreg.configs", version_base="1.3"):
            return compose("train", overrides=[*base, *overrides])

    return _compose
