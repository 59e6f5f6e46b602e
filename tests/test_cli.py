"""The command line as users run it: entreg-train / python -m entreg.train, multirun, ddp_sim,
and a non-editable install that still finds its configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = Path(sys.executable).parent / "entreg-train"
TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.size=8",
]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_python_m_entreg_train_prints_results_and_writes_logs(tmp_path):
    result = run([sys.executable, "-m", "entreg.train", *TINY], cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    for label in ("accuracy", "NLL", "ECE", "mean entropy"):
        assert label in result.stdout
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_help_lists_the_config_groups(tmp_path):
    result = run([str(ENTRY), "--help"], cwd=tmp_path)
    assert result.stdout.startswith("entreg-train is powered by Hydra")
    for group in ("backbone", "data", "experiment", "model", "trainer"):
        assert f"{group}:" in result.stdout


@pytest.mark.parametrize("command", ["entreg-adapt", "entreg-sample"])
def test_every_entry_point_names_itself_in_help(tmp_path, command):
    result = run([str(ENTRY.with_name(command)), "--help"], cwd=tmp_path)
    assert result.stdout.startswith(f"{command} is powered by Hydra")


def test_multirun_over_seeds(tmp_path):
    run([str(ENTRY), "-m", "seed=1,2", *TINY, "logger=none"], cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()


def test_ddp_sim_trains_with_two_processes(tmp_path):
    result = run(
        [str(ENTRY), "trainer=ddp_sim", *TINY, "logger=csv"], cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs")
    )
    assert "accuracy" in result.stdout
    assert "ddp_fork" in (next((tmp_path / "logs").rglob("config.yaml"))).read_text()
    assert "GLOBAL_RANK: 1" in result.stdout + result.stderr  # the second process really ran


def test_non_editable_install_finds_its_configs(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a clean copy of the tracked files: no stale build/ can leak into the wheel
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("entreg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "entreg/configs/train.yaml" in names and "entreg/configs/experiment/digits_era.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import entreg, entreg.cli; from hydra import compose, initialize_config_module\n"
        f"assert entreg.__file__.startswith({str(site)!r}), entreg.__file__\n"
        "with initialize_config_module('entreg.configs', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=digits_ce'])\n"
        "print(cfg.model.output_activation, cfg.model.backbone)\n"
    )
    result = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(site))
    assert result.stdout.split() == ["none", "small_cnn"]


def test_torchrun_overrides_only_for_ranks_above_zero():
    from entreg.cli import torchrun_overrides

    assert torchrun_overrides({}) == []  # not under torchrun
    assert torchrun_overrides({"TORCHELASTIC_RUN_ID": "x", "RANK": "0"}) == []
    overrides = torchrun_overrides({"TORCHELASTIC_RUN_ID": "x", "RANK": "1"})
    assert "hydra.output_subdir=null" in overrides and any("entreg-rank1-" in o for o in overrides)


@pytest.mark.slow
def test_torchrun_launch_with_two_cpu_processes(tmp_path):
    """The documented multi-GPU launch, on CPU: one run directory, written by rank 0 only."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += ["-m", "entreg.train", "trainer=ddp", "trainer.devices=2", "trainer.sync_batchnorm=false"]
    args += [*TINY, "logger=csv"]
    result = run(args, cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    assert "accuracy" in result.stdout
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "strategy: ddp" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]  # rank 1 left nothing in the working dir


def test_entreg_adapt_prints_the_comparison(tmp_path):
    import lightning as L

    from entreg.data import DigitsDataModule
    from entreg.modules import ClassificationModule

    model = ClassificationModule("small_cnn", 10, 1, backbone_kwargs={"widths": (8, 16)})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, DigitsDataModule(size=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    args = [sys.executable, "-m", "entreg.adapt", f"ckpt_path={tmp_path / 'model.ckpt'}", "method=sar", "stream.size=8"]
    args += ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    result = run(args, cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    for text in ("gaussian_noise", "contrast", "gaussian_blur", "online acc (pre-update)", "adapted acc"):
        assert text in result.stdout
    (run_dir,) = (tmp_path / "logs" / "adapt" / "runs").iterdir()
    assert list(run_dir.rglob("events.out.tfevents.*"))  # tta/entropy, tta/selected, tta/online_error ...


def test_finetune_a_flow_checkpoint_with_egrpo(tmp_path):
    """entreg-train an unconditional ring flow for one short epoch, then entreg-finetune it with E-GRPO: the
    table compares base and fine-tuned, and the run writes TensorBoard events (with the sample histogram) and
    a checkpoint."""
    logs = tmp_path / "logs"
    quiet = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    flow = ["experiment=ring2d_flow", "model.num_classes=null", "trainer.max_epochs=1", "data.n_train=512",
            "data.n_val=64", "callbacks.progress_bar=null", *quiet]  # fmt: skip
    run([sys.executable, "-m", "entreg.train", *flow], cwd=tmp_path, ENTREG_LOG_DIR=str(logs))
    (ckpt,) = (logs / "ring2d_flow" / "runs").glob("*/checkpoints/last.ckpt")
    grpo = ["grpo.steps=4", "grpo.active_steps=2", "grpo.group_size=4", "grpo.prompts=2",
            "grpo.iterations_per_epoch=3", "grpo.eval_every=3", "grpo.eval_samples=64", *quiet]  # fmt: skip
    result = run(
        [str(ENTRY.with_name("entreg-finetune")), f"base_checkpoint={ckpt}", *grpo],
        cwd=tmp_path,
        ENTREG_LOG_DIR=str(logs),
    )
    for label in ("reward", "path_kl", "in_target", "balance", "reward_calls"):
        assert label in result.stdout
    (run_dir,) = (logs / "finetune" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events)).Reload().Tags()
    assert "eval/samples" in tags["images"] and "eval/reward" in tags["scalars"] and "cost/units" in tags["scalars"]
    assert {"train/reward", "train/balance", "train/clip_fraction", "eval/path_kl"} <= set(tags["scalars"])
