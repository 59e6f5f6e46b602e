"""The README's code runs as printed and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_add_entreg_to_your_project(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ to the working directory
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(python_block("Add entreg to your project"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    # "close to 1.0": the controller holds the training entropy at its target of 1 nat
    assert float(trainer.callback_metrics["train/pred_entropy_mean"]) == pytest.approx(1.0, abs=0.15)
    assert trainer.callbacks[1].coef > 0 and trainer.lightning_module.entropy_bonus == trainer.callbacks[1].coef
    assert "train/repr_entropy" in trainer.callback_metrics
    assert (tmp_path / "lightning_logs").is_dir()
