"""The command line as users run it: entreg-train / python -m entreg.train, multirun, ddp_sim,
and a non-editable install that still finds its configs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = Path(sys.executable).parent / "entreg-train"
TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",  # with the default callbacks' progress bar: dropped, not an error
    "trainer.enable_model_summary=false",
    "data.size=8",
]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env}
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_python_m_entreg_train_prints_results_and_writes_logs(tmp_path):
    result = run([sys.executable, "-m", "entreg.train", *TINY], cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    for label in ("accuracy", "NLL", "ECE", "mean entropy"):
        assert label in result.stdout
    assert "Tip:" not in result.stdout + result.stderr and "LeafSpec" not in result.stderr  # no tips, no noise
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_help_lists_the_config_groups(tmp_path):
    result = run([str(ENTRY), "--help"], cwd=tmp_path)
    assert result.stdout.startswith("entreg-train is powered by Hydra")
    for group in ("backbone", "data", "experiment", "model", "trainer"):
        assert f"{group}:" in result.stdout


@pytest.mark.parametrize("command", ["entreg-adapt", "entreg-sample", "entreg-finetune"])
@pytest.mark.parametrize("python_m", [False, True], ids=["script", "python-m"])
def test_every_entry_point_names_itself_in_help(tmp_path, command, python_m):
    """Each entry point, as an installed script or as ``python -m entreg.<command>``."""
    name = command.removeprefix("entreg-")
    args = [sys.executable, "-m", f"entreg.{name}"] if python_m else [str(ENTRY.with_name(command))]
    result = run([*args, "--help"], cwd=tmp_path)
    assert result.stdout.startswith(f"{command} is powered by Hydra")


def test_multirun_over_seeds_prints_a_summary(tmp_path):
    """Each job writes metrics.json; the multirun ends with mean ± std and every job's value of each metric."""
    import statistics

    args = [str(ENTRY), "-m", "seed=1,2", *TINY, "logger=none"]
    out = run(args, cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs")).stdout
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    summary = out[out.index("multirun summary: 2 jobs") :]
    assert printed_row(summary, "metric") == ["metric", "mean ± std", "seed=1", "seed=2"]
    jobs = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    for name in ("test/acc", "test/nll"):
        values = [job[name] for job in jobs]
        spread = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
        assert printed_row(summary, name) == [name, spread, *(f"{v:.4f}" for v in values)]
    assert f"multirun directory: {sweep}" in summary


def test_ddp_sim_trains_with_two_processes(tmp_path):
    result = run(
        [str(ENTRY), "trainer=ddp_sim", *TINY, "logger=csv"], cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs")
    )
    assert "accuracy" in result.stdout
    (last,) = (tmp_path / "logs").rglob("checkpoints/last.ckpt")
    assert f"last checkpoint: {last}" in result.stdout  # the fit ran in forked workers: found on disk
    assert "ddp_fork" in (next((tmp_path / "logs").rglob("config.yaml"))).read_text()
    assert "GLOBAL_RANK: 1" in result.stdout + result.stderr  # the second process really ran


def test_non_editable_install_finds_its_configs(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a clean copy of the tracked files: no stale build/ can leak into the wheel
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path)]
    built = subprocess.run([*build, str(source)], check=True, capture_output=True, text=True, timeout=300)
    assert "BuildBackendWarning" not in built.stdout + built.stderr  # e.g. a config group absent from `packages`
    (wheel,) = tmp_path.glob("entreg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = {f"entreg/configs/{path.relative_to(source / 'configs')}" for path in source.glob("configs/**/*.yaml")}
    assert "entreg/configs/experiment/digits_era.yaml" in configs and configs <= set(names)
    assert {"entreg/rl/sac.py", "entreg/tta/tent.py"} <= set(names)  # every sub-package is discovered
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
    for line in (f"run directory: {run_dir}", f"TensorBoard logs: {run_dir / 'tensorboard'}", "checkpoint: "):
        assert line in result.stdout
    # each shift by name: source, online and adapted accuracy, the values metrics.json and the table hold
    logged, written = scalars(run_dir / "tensorboard"), json.loads((run_dir / "metrics.json").read_text())
    assert "tta/online_error" in logged
    for shift in ("gaussian_noise", "contrast", "gaussian_blur"):
        row = printed_row(result.stdout, shift)
        for column, name in enumerate(("source", "online", "adapted"), start=1):
            value = logged[f"adapt/{shift}/{name}_acc"]
            assert value == [pytest.approx(written[f"{shift}/{name}"])] and row[column] == f"{value[0]:.4f}"


# ---- entreg-adapt on a benchmark: a source model from its weights file, a stream in its published layout, a protocol


CIFAR_C = ["gaussian_noise", "fog"]  # the fixture's corruptions: 4 images each at every severity


def weights_file(kind: str, suffix: str, tmp_path: Path) -> list[str]:
    """Overrides that make ``model=<kind>`` a small random-weights 10-class model saved as ``suffix``."""
    import torch

    if kind == "robustbench":  # RobustBench's layout: 'state_dict' with DataParallel's module. prefixes, no mu/sigma
        from entreg.nn.robustbench import robustbench_architecture

        state = robustbench_architecture("Hendrycks2020AugMix_WRN", "cifar10").state_dict()
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items() if k not in ("mu", "sigma")}},
                   tmp_path / f"wrn{suffix}")  # fmt: skip
        return ["model=robustbench", "model.name=Hendrycks2020AugMix_WRN", f"model.file={tmp_path / f'wrn{suffix}'}"]
    if kind == "timm_pretrained":
        import timm

        state = timm.create_model("resnet10t", pretrained=False, num_classes=10).state_dict()
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp_path / f"r{suffix}"))
        else:
            torch.save(state, tmp_path / f"r{suffix}")
        return ["model=timm_pretrained", "model.name=resnet10t.c3_in1k", f"model.file={tmp_path / f'r{suffix}'}",
                "model.num_classes=10"]  # fmt: skip
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / f"resnet18{suffix}")
    return ["model=torchvision_pretrained", "model.name=resnet18", f"model.file={tmp_path / f'resnet18{suffix}'}",
            "model.num_classes=10"]  # fmt: skip


def benchmark_overrides(tmp_path: Path, model: list[str]) -> list[str]:
    """entreg-adapt <model> stream=cifar10_c (a fixture in the published layout) protocol=continual method=tent."""
    from tests.stream_fixtures import write_cifar_c

    write_cifar_c(tmp_path / "CIFAR-10-C", CIFAR_C, n=4)
    stream = ["stream=cifar10_c", f"stream.root={tmp_path / 'CIFAR-10-C'}", f"stream.corruptions=[{','.join(CIFAR_C)}]",
              "stream.num_workers=0", "stream.batch_size=4"]  # fmt: skip
    return [*model, *stream, "protocol=continual", "method=tent", "method.lr=0.01", *QUIET]


def plain_loop(cfg, source: list | None = None) -> dict[str, dict[str, float]]:
    """The reference: the method of the config (its options) on the model the config builds, a plain loop over the
    stream's domains in order, never reset, in batches of 4 (``source``: clean batches for ``prepare``): online error
    and mean entropy per corruption."""
    import torch
    from hydra.utils import instantiate

    from entreg.entropy import categorical_entropy
    from entreg.tta import build_method

    model = instantiate(cfg.model, _convert_="all").eval()
    stream = instantiate(cfg.stream, _convert_="all")
    stream.set_transform(model.image_transform())
    stream.setup("test")
    options = {k: cfg.method[k] for k in ("lr", "e_margin", "d_margin", "fisher_alpha") if k in cfg.method}
    method, out = build_method(cfg.method.method, model, model.hparams.num_classes, **options), {}
    if source is not None:
        method.prepare(source)
    for domain in stream.domains:
        items = [domain.dataset[i] for i in range(len(domain.dataset))]
        x, y = torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])
        wrong, entropy = 0, 0.0
        with torch.no_grad():
            for xb, yb in zip(x.split(4), y.split(4), strict=True):
                logits, _ = method.adapt(xb)
                wrong += int((logits.argmax(1) != yb).sum())
                entropy += float(categorical_entropy(logits, dim=1).sum())
        out[domain.corruption] = {"error": wrong / len(y), "entropy": entropy / len(y)}
    return out


def test_entreg_adapt_benchmark_prints_writes_logs_and_equals_a_plain_loop(tmp_path):
    """The command a user runs: a RobustBench checkpoint, CIFAR-10-C on disk, the continual protocol, Tent after the
    source and BN-adapt rows; the table printed with images/s, written as CSV and JSON, logged to TensorBoard; the
    method's row equals a plain PyTorch loop of Tent over the same stream."""
    overrides = benchmark_overrides(tmp_path, weights_file("robustbench", ".pt", tmp_path))
    command = [sys.executable, "-m", "entreg.adapt", *overrides]
    result = run(command, cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    (run_dir,) = (tmp_path / "logs" / "adapt" / "runs").iterdir()
    table = json.loads((run_dir / "tta_table.json").read_text())
    assert table["segments"] == CIFAR_C and list(table["rows"]) == ["source", "bn_adapt", "tent"]
    expected = plain_loop(compose("adapt", *overrides, f"paths.output_dir={tmp_path / 'unused'}"))
    for corruption, want in expected.items():
        assert table["rows"]["tent"][corruption]["error"] == pytest.approx(want["error"], abs=1e-9)
        assert table["rows"]["tent"][corruption]["entropy"] == pytest.approx(want["entropy"], rel=1e-5)
    header = "method,gaussian_noise,fog,mean"
    assert (run_dir / "tta_table.csv").read_text().splitlines()[0] == header
    row = printed_row(result.stdout, "tent")
    assert row[1] == f"{100 * table['rows']['tent']['gaussian_noise']['error']:.2f}" and float(row[-1]) > 0
    assert "images/s" in result.stdout and f"table (csv): {run_dir / 'tta_table.csv'}" in result.stdout
    logged = scalars(run_dir / "tensorboard")
    assert logged["benchmark/tent/fog/error"] == [pytest.approx(table["rows"]["tent"]["fog"]["error"])]
    assert "tta/online_error" in logged  # the method's row logs its batches
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["source/mean_error"] == pytest.approx(table["error_percent"]["source"]["mean"] / 100)


FORMATS = [("timm_pretrained", ".safetensors"), ("timm_pretrained", ".pth"), ("timm_pretrained", ".bin")]


@pytest.mark.parametrize(("kind", "suffix"), [*FORMATS, ("torchvision_pretrained", ".pth")])
def test_entreg_adapt_benchmark_from_every_weights_format_equals_a_plain_loop(kind, suffix, tmp_path):
    from entreg.cli import adapt

    overrides = benchmark_overrides(tmp_path, weights_file(kind, suffix, tmp_path))
    cfg = compose("adapt", *overrides, "baselines=[]", "logger=none", f"paths.output_dir={tmp_path / 'run'}")
    metrics = adapt(cfg)
    expected = plain_loop(cfg)
    for corruption, want in expected.items():
        assert metrics[f"tent/{corruption}/error"] == pytest.approx(want["error"], abs=1e-9)
    rows = json.loads((tmp_path / "run" / "tta_table.json").read_text())["rows"]["tent"]
    assert {c: rows[c]["entropy"] for c in CIFAR_C} == pytest.approx({c: expected[c]["entropy"] for c in CIFAR_C})


def test_entreg_adapt_benchmark_reads_eatas_source_data_from_a_stream_config(tmp_path):
    """EATA's Fisher information from source_data given as a stream config (its images through the model's
    transform): the row equals a plain loop whose method got the same clean batches through prepare."""
    import torch

    from entreg.cli import adapt

    overrides = benchmark_overrides(tmp_path, weights_file("robustbench", ".pt", tmp_path))
    root = tmp_path / "CIFAR-10-C"
    source = f"{{_target_:entreg.data.CIFAR10CDataModule,root:{root},corruptions:[fog],severities:[1]}}"
    options = ["method=eata", "method.source_batches=1", "method.e_margin=3.0", f"source_data={source}"]
    cfg = compose("adapt", *overrides, *options, "baselines=[]", "logger=none", f"paths.output_dir={tmp_path / 'run'}")
    metrics = adapt(cfg)
    clean = [torch.stack([image for image, _ in fog_items(tmp_path)])]
    expected = plain_loop(cfg, source=clean)
    for corruption, want in expected.items():
        assert metrics[f"eata/{corruption}/error"] == pytest.approx(want["error"], abs=1e-9)
    rows = json.loads((tmp_path / "run" / "tta_table.json").read_text())["rows"]["eata"]
    assert rows["fog"]["entropy"] == pytest.approx(expected["fog"]["entropy"], rel=1e-5)


def fog_items(tmp_path: Path) -> list:
    """The fixture's fog images at severity 1 in the stream's order, as the source data gives them."""
    from entreg.data import CIFAR10CDataModule

    stream = CIFAR10CDataModule(tmp_path / "CIFAR-10-C", corruptions=["fog"], severities=[1], num_workers=0)
    stream.setup("test")
    return [stream.domains[0].dataset[i] for i in range(len(stream.domains[0].dataset))]


def test_entreg_adapt_gradual_loads_the_severities_the_protocol_visits(tmp_path):
    from entreg.cli import adapt

    overrides = [o for o in benchmark_overrides(tmp_path, weights_file("robustbench", ".pt", tmp_path))
                 if not o.startswith("method")]  # fmt: skip
    overrides += ["protocol=gradual", "method=bn_adapt", "baselines=[]", "logger=none"]
    metrics = adapt(compose("adapt", *overrides, f"paths.output_dir={tmp_path / 'run'}"))
    table = json.loads((tmp_path / "run" / "tta_table.json").read_text())
    up, down = [f"fog-{s}" for s in (1, 2, 3, 4, 5)], [f"fog-{s}#2" for s in (4, 3, 2, 1)]
    assert table["segments"][9:] == [*up, *down] and len(table["segments"]) == 18
    assert table["info"]["reset"] == "continual" and "bn_adapt/fog-5/error" in metrics


def test_entreg_adapt_protocol_errors_name_what_is_missing(tmp_path):
    from entreg.cli import adapt

    base = [*QUIET, "logger=none", f"paths.output_dir={tmp_path}"]
    with pytest.raises(ValueError, match=r"choose a protocol too, e\.g\. protocol=continual"):
        adapt(compose("adapt", *base, *weights_file("robustbench", ".pt", tmp_path)))
    with pytest.raises(ValueError, match=r"give the source model, model=<robustbench"):
        adapt(compose("adapt", *base, "protocol=continual"))
    with pytest.raises(ValueError, match=r"protocol=continual needs a benchmark stream with domains \(stream="):
        adapt(compose("adapt", *base, "protocol=continual", *weights_file("robustbench", ".pt", tmp_path)))


def test_finetune_a_flow_checkpoint_with_egrpo(tmp_path):
    """entreg-train an unconditional ring flow for one short epoch (a `test: false` experiment), then
    entreg-finetune it with E-GRPO: the table compares base and fine-tuned, and the run writes TensorBoard events
    (with the sample histogram) and a checkpoint. Both commands print where their logs and checkpoints are."""
    from entreg.checkpoint_kind import checkpoint_kind

    logs = tmp_path / "logs"
    quiet = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    flow = ["experiment=ring2d_flow", "model.num_classes=null", "trainer.max_epochs=1", "data.n_train=512",
            "data.n_val=64", "callbacks.progress_bar=null", *quiet]  # fmt: skip
    trained = run([sys.executable, "-m", "entreg.train", *flow], cwd=tmp_path, ENTREG_LOG_DIR=str(logs)).stdout
    (ckpt,) = (logs / "ring2d_flow" / "runs").glob("*/checkpoints/last.ckpt")
    (best,) = ckpt.parent.glob("epoch_*.ckpt")
    for line in (f"run directory: {ckpt.parents[1]}", f"TensorBoard logs: {ckpt.parents[1] / 'tensorboard'}",
                 f"best checkpoint: {best}", f"last checkpoint: {ckpt}", "val/loss"):  # fmt: skip
        assert line in trained
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
    assert checkpoint_kind(run_dir / "checkpoints" / "last.ckpt").name == "grpo"
    (best,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")  # ranked by eval/reward, evaluated at the epoch's end
    assert f"best checkpoint: {best}" in result.stdout
    for line in (f"TensorBoard logs: {run_dir / 'tensorboard'}", f"last checkpoint: {run_dir / 'checkpoints'}"):
        assert line in result.stdout
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events)).Reload().Tags()
    assert "eval/samples" in tags["images"] and "eval/reward" in tags["scalars"] and "cost/units" in tags["scalars"]
    assert {"train/reward", "train/balance", "train/clip_fraction", "eval/path_kl"} <= set(tags["scalars"])


# ---- checkpoints: ckpt_path=last, missing paths, wrong kinds -------------------------------------------------------


def compose(config: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("entreg.configs", version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


QUIET = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SMALL_CNN = ["data.size=8", "model.backbone_kwargs.widths=[8,16]"]


def train_overrides(logs: Path, run: str, *overrides: str) -> list[str]:
    """A tiny entreg-train run named ``run`` under ``logs`` (its checkpoint callback on, no progress bar)."""
    where = [f"paths.log_dir={logs}", f"paths.output_dir={logs / 'train' / 'runs' / run}"]
    fast = ["+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "callbacks.progress_bar=null"]
    return [*where, *QUIET, *fast, "callbacks.model_summary=null", "logger=none", *SMALL_CNN, *overrides]


def test_ckpt_path_last_resumes_the_most_recent_run(tmp_path, capsys):
    import torch

    from entreg.cli import train

    logs = tmp_path / "logs"
    train(compose("train", *train_overrides(logs, "first", "trainer.max_epochs=1", "+trainer.limit_train_batches=2")))
    first = logs / "train" / "runs" / "first" / "checkpoints" / "last.ckpt"
    older = logs / "train" / "runs" / "z_older" / "checkpoints" / "last.ckpt"  # sorts last by name, is older
    older.parent.mkdir(parents=True)
    shutil.copy(first, older)
    os.utime(older, (first.stat().st_mtime - 60, first.stat().st_mtime - 60))
    resumed = ["trainer.max_epochs=2", "+trainer.limit_train_batches=3", "ckpt_path=last", "test=false"]
    train(compose("train", *train_overrides(logs, "second", *resumed)))
    assert f"ckpt_path=last: resuming the newest run of train from {first}" in capsys.readouterr().out
    second = torch.load(logs / "train" / "runs" / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 2 + 3  # 2 steps of the first run's epoch, then 3 of the second epoch


def test_ckpt_path_last_names_a_newest_run_without_checkpoint_instead_of_resuming_an_older_one(tmp_path):
    """The newest run stopped before writing a checkpoint (killed, crashed early): ckpt_path=last says so and
    names the newest run that has one, instead of silently continuing that other run."""
    from entreg.cli import train

    runs = tmp_path / "logs" / "train" / "runs"
    older = runs / "2026-01-01_10-00-00" / "checkpoints" / "last.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"a checkpoint")
    os.utime(older, (older.stat().st_mtime - 120, older.stat().st_mtime - 120))
    newest = runs / "2026-01-01_11-00-00"
    (newest / "tensorboard").mkdir(parents=True)
    (newest / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    cfg = compose("train", *train_overrides(tmp_path / "logs", "this_run", "ckpt_path=last"))
    with pytest.raises(FileNotFoundError) as error:
        train(cfg)
    assert str(error.value) == (
        f"ckpt_path=last: the newest run of train, {newest}, has no checkpoint (it stopped before writing one); "
        f"the newest run that has one is {older.parents[1]}: to resume it, pass ckpt_path={older}"
    )


def test_a_ctrl_c_writes_the_state_prints_where_and_ckpt_path_last_resumes_it(tmp_path, capsys):
    """entreg-train stopped by SIGINT in the middle of its fit: exit status 130, the checkpoint of the exact state
    and the run directory printed; `ckpt_path=last` then continues that run, not an older one."""
    import signal
    import time

    import torch

    from entreg.cli import train

    logs = tmp_path / "logs"
    run([str(ENTRY), *TINY, "logger=none", "test=false"], cwd=tmp_path, ENTREG_LOG_DIR=str(logs))  # an older run
    args = [str(ENTRY), *TINY, "trainer.max_epochs=10000", "logger=none", "callbacks.model_summary=null"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ENTREG_LOG_DIR": str(logs)}
    process = subprocess.Popen(args, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = logs / "train" / "runs"
    deadline = time.monotonic() + 120
    while len(list(runs.glob("*/checkpoints/epoch_*.ckpt"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # the second run's first epoch is done: its fit is running
    process.send_signal(signal.SIGINT)
    out, err = (text.decode() for text in process.communicate(timeout=120))
    assert process.returncode == 128 + signal.SIGINT, out[-2000:] + err[-2000:]
    stopped = max(runs.iterdir(), key=lambda run: run.name)
    last = stopped / "checkpoints" / "last.ckpt"
    assert f"entreg-train: stopped by SIGINT; the exact state is in {last}" in out
    assert f"run directory: {stopped}" in out and "Traceback" not in err
    step = torch.load(last, weights_only=True)["global_step"]
    assert step > 2  # written at the interruption, after the first epoch's checkpoint (step 2)

    where = [f"paths.log_dir={logs}", f"paths.output_dir={runs / 'resumed'}", "logger=none", "test=false"]
    resumed = ["trainer.max_epochs=1000000", f"+trainer.max_steps={step + 2}", "ckpt_path=last"]
    metrics = train(compose("train", *TINY, *where, *resumed))
    assert f"ckpt_path=last: resuming the newest run of train from {last}" in capsys.readouterr().out
    assert metrics["step"] == step + 2  # two more steps than the interrupted run had done


@pytest.mark.parametrize("full_error", [False, True])
def test_a_user_error_prints_its_message_alone_and_the_run_directory(tmp_path, full_error):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ENTREG_LOG_DIR": str(tmp_path / "logs")}
    if full_error:
        environment["HYDRA_FULL_ERROR"] = "1"
    args = [str(ENTRY.with_name("entreg-sample")), "ckpt_path=some.ckpt", "n=0"]
    result = subprocess.run(args, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == (1 if full_error else 2)
    assert ("Traceback" in result.stderr) == full_error
    assert "n must be an integer >= 1, got 0" in result.stderr
    if not full_error:
        assert result.stderr.startswith("entreg-sample: error: n must be an integer >= 1, got 0\n")
        (run_dir,) = (tmp_path / "logs" / "sample" / "runs").iterdir()
        assert f"run directory: {run_dir}" in result.stdout


def test_missing_checkpoints_fail_before_anything_is_built(tmp_path):
    from entreg.cli import finetune, train

    logs = tmp_path / "logs"
    cfg = compose("train", *train_overrides(logs, "run", "ckpt_path=last"))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no run of train has a last checkpoint \(looked for "):
        train(cfg)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=missing\.ckpt: no such file"):
        train(compose("train", *train_overrides(logs, "run", "ckpt_path=missing.ckpt")))
    with pytest.raises(FileNotFoundError, match=r"base_checkpoint=missing\.ckpt: no such file"):
        finetune(compose("finetune", "base_checkpoint=missing.ckpt", f"paths.output_dir={tmp_path}"))
    assert not logs.exists()  # no run directory, logger or checkpoint was created


@pytest.mark.parametrize("model", ["timm_pretrained", "torchvision_pretrained", "robustbench"])
def test_entreg_train_refuses_adapt_source_models_before_anything_is_built(model, tmp_path):
    """The entreg-adapt source models have no training step: entreg-train names entreg-adapt instead of failing
    inside Lightning, before the weights file (missing here), the data or a logger is touched; run from the
    command line it names the config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    from entreg.cli import train

    logs = tmp_path / "logs"
    overrides = [f"paths.log_dir={logs}", f"paths.output_dir={logs / 'run'}", f"model={model}", "model.file=x.pt"]
    message = r"cannot be trained: PretrainedClassifier has no training step .* use it with entreg-adapt model="
    with pytest.raises(
        ValueError, match=rf"^model\._target_=entreg\.modules\.PretrainedClassifier\.\w+ {message}\.\.\."
    ):
        train(compose("train", *overrides))
    assert not logs.exists()
    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # as the command line sets it: the config names its model choice
    try:
        with pytest.raises(ValueError, match=rf"^model={model} {message}{model} "):
            train(cfg)
    finally:
        HydraConfig.instance().cfg = before


@pytest.mark.parametrize(("key", "value"), [("n", 0), ("num_inference_steps", 0), ("num_inference_steps", -2)])
def test_entreg_sample_rejects_counts_below_one_before_loading(key, value, tmp_path):
    from entreg.cli import sample

    cfg = compose("sample", "ckpt_path=not-loaded.ckpt", f"paths.output_dir={tmp_path}", f"{key}={value}")
    with pytest.raises(ValueError, match=f"^{key} must be an integer >= 1, got {value}$"):
        sample(cfg)


HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None  # the RL agents' envs (extra entreg[rl])
HAS_T2I = all(importlib.util.find_spec(name) is not None for name in ("transformers", "peft"))  # entreg[t2i]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, Path] | None:
    """A tiny random SD3 pipeline directory and a prompt file (None without the t2i extra)."""
    if not HAS_T2I:
        return None
    from entreg.flow.tiny_pipeline import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "prompts.txt").write_text("a cat\na dog\n")
    return save_tiny_pipeline(folder / "sd3", "sd3"), folder / "prompts.txt"


def pipeline_module(tiny_pipeline: tuple[Path, Path]) -> Any:
    """A GRPOPipelineModule of the tiny pipeline, shrunk to one LoRA iteration of 2 images of 16 x 16."""
    from entreg.flow.image_rewards import JPEGCompressibility
    from entreg.modules.grpo_pipeline import GRPOPipelineModule

    path, prompts = tiny_pipeline
    return GRPOPipelineModule(
        str(path), JPEGCompressibility(), prompts, height=16, width=16, steps=2, active_steps=2, group_size=2,
        prompts=1, lora_rank=4, lora_alpha=8, guidance_scale=1.0, max_sequence_length=8, eval_every=0,
        iterations_per_epoch=1, eval_per_prompt=1, variant="flow_grpo",
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_pipeline) -> dict[str, Path]:
    """One-step checkpoints of each kind, from the real configs: classifier, diffusion, flow, grpo (fine-tuned from
    the flow), grpo_pipeline (a tiny SD3 pipeline's LoRA, with the t2i extra), the RL agents sac and ppo (where
    MuJoCo is installed), and a LightningModule of none of entreg's kinds."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.demos.boring_classes import BoringModel

    from entreg.modules.grpo import GRPOModule

    folder = tmp_path_factory.mktemp("checkpoints")
    rl = {
        "sac": ["experiment=invertedpendulum_sac", "model.hidden=[8,8]", "model.learning_starts=0"],
        "ppo": ["experiment=invertedpendulum_ppo", "model.hidden=[8,8]", "model.n_steps=8", "model.batch_size=8"],
    }
    models = {
        "classifier": SMALL_CNN,
        "diffusion": ["experiment=gmm2d_diffusion", "model.denoiser.hidden=8"],
        "flow": ["experiment=ring2d_flow", "model.net.hidden=8", "model.num_classes=null"],
        "grpo": ["grpo.steps=4", "grpo.active_steps=2", "grpo.group_size=4", "grpo.prompts=2", "grpo.eval_every=0"],
        **({"grpo_pipeline": []} if HAS_T2I else {}),
        **(rl if HAS_MUJOCO else {}),
        "other": [],
    }  # fmt: skip
    paths = {}
    for kind, overrides in models.items():
        config = "finetune" if kind.startswith("grpo") else "train"
        cfg = compose(config, "callbacks=none", "logger=none", f"paths.output_dir={folder}", *overrides)
        if kind == "grpo":
            options = instantiate(cfg.grpo, _convert_="all")
            model, data = GRPOModule.from_flow_checkpoint(paths["flow"], instantiate(cfg.reward), **options), None
        elif kind == "grpo_pipeline":
            model, data = pipeline_module(tiny_pipeline), None
        else:
            model = BoringModel() if kind == "other" else instantiate(cfg.model, _convert_="all")
            data = instantiate(cfg.data, _convert_="all") if cfg.get("data") and kind != "other" else None
        trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
        trainer.fit(model, datamodule=data)
        paths[kind] = folder / f"{kind}.ckpt"
        trainer.save_checkpoint(paths[kind])
    return paths


def test_checkpoint_kind_names_each_module(checkpoints, tmp_path):
    import torch

    from entreg.checkpoint_kind import KINDS, checkpoint_kind, require_kind

    assert {kind: getattr(checkpoint_kind(path), "name", None) for kind, path in checkpoints.items()} == {
        **{kind.name: kind.name for kind in KINDS if kind.name in checkpoints},
        "other": None,
    }
    optional = [*(["sac", "ppo"] if HAS_MUJOCO else []), *(["grpo_pipeline"] if HAS_T2I else [])]
    assert set(checkpoints) >= {"classifier", "diffusion", "flow", "grpo", *optional}
    assert {kind.name for kind in KINDS} == {"classifier", "diffusion", "flow", "grpo", "grpo_pipeline", "sac", "ppo"}
    require_kind(checkpoints["other"], ["classifier"], "entreg-adapt ckpt_path", allow_other=True)  # a user's module
    with pytest.raises(ValueError, match="was written by none of ClassificationModule, DiffusionModule"):
        require_kind(checkpoints["other"], ["diffusion"], "entreg-sample ckpt_path")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint"):
        checkpoint_kind(tmp_path / "weights.pt")


@pytest.mark.skipif(not HAS_MUJOCO, reason="the RL agents need MuJoCo (pip install 'entreg[rl]')")
def test_the_rl_kinds_evaluate_as_their_message_says(checkpoints):
    """No command evaluates an RL agent: the wrong-kind message names the Python call that does, and it runs."""
    import math

    import entreg.modules
    from entreg.checkpoint_kind import KINDS

    for kind in [kind for kind in KINDS if kind.name in ("sac", "ppo")]:
        assert f"{kind.module}.load_from_checkpoint(<checkpoint>).evaluate() in Python" in kind.command
        agent = getattr(entreg.modules, kind.module).load_from_checkpoint(checkpoints[kind.name], map_location="cpu")
        assert all(math.isfinite(value) for value in np.atleast_1d(agent.evaluate()))


WRONG_KIND = [
    ("sample", "classifier", "entreg-sample ckpt_path takes a diffusion .* is a classifier checkpoint "
     r"\(ClassificationModule\): use it with entreg-adapt ckpt_path="),
    ("sample", "flow", r"is a flow checkpoint \(FlowMatchingModule\): use it with entreg-finetune base_checkpoint="),
    ("finetune", "classifier", "entreg-finetune base_checkpoint takes a flow .* is a classifier checkpoint"),
    ("finetune", "diffusion", r"is a diffusion checkpoint \(DiffusionModule\): use it with entreg-sample ckpt_path="),
    ("adapt", "diffusion", "entreg-adapt ckpt_path takes a classifier .* is a diffusion checkpoint"),
    ("adapt", "flow", "entreg-adapt ckpt_path takes a classifier .* is a flow checkpoint"),
    ("adapt", "grpo", r"is a grpo checkpoint \(GRPOModule\): use it with entreg-finetune ckpt_path=<checkpoint> "
     r"\(to resume the fine-tuning run\)"),
    ("sample", "sac", r"is a sac checkpoint \(SACModule\): use it with entreg-train experiment=<its experiment> "
     r"ckpt_path=<checkpoint> \(to resume training\); its evaluation episodes: "
     r"SACModule.load_from_checkpoint\(<checkpoint>\).evaluate\(\) in Python"),
    ("adapt", "ppo", r"is a ppo checkpoint \(PPOModule\): use it with entreg-train experiment=<its experiment> "
     r"ckpt_path=<checkpoint> .* PPOModule.load_from_checkpoint"),
    ("sample", "grpo_pipeline", r"is a grpo_pipeline checkpoint \(GRPOPipelineModule\): use it with entreg-finetune "
     r"pipeline=<dir> prompts=<file> ckpt_path=<checkpoint> \(to resume the text-to-image fine-tuning run\)"),
    ("finetune", "grpo_pipeline", "entreg-finetune base_checkpoint takes a flow .* is a grpo_pipeline checkpoint"),
]  # fmt: skip
# what each command takes: (command, key, the kind it takes); entreg-finetune's ckpt_path is a grpo checkpoint next to
# base_checkpoint, a grpo_pipeline one next to pipeline=<dir> prompts=<file>
TAKES = [("sample", "ckpt_path", "diffusion"), ("adapt", "ckpt_path", "classifier"),
         ("finetune", "base_checkpoint", "flow"), ("finetune", "ckpt_path", "grpo"),
         ("finetune", "ckpt_path", "grpo_pipeline")]  # fmt: skip


def refuse(command: str, key: str, path: Path, checkpoints: dict[str, Path], route: tuple[str, ...] = ()) -> ValueError:
    """The ValueError of ``entreg-<command> <route> <key>=<path>`` (a GRPO ``ckpt_path`` next to a good base
    checkpoint unless ``route`` says otherwise)."""
    import entreg.cli

    base = [f"base_checkpoint={checkpoints['flow']}"] if key == "ckpt_path" and command == "finetune" else []
    cfg = compose(command, *(route or base), f"{key}={path}", "paths.output_dir=unused")
    with pytest.raises(ValueError) as error:
        getattr(entreg.cli, command)(cfg)
    return error.value


@pytest.mark.parametrize(("command", "kind", "message"), WRONG_KIND)
def test_a_wrong_kind_of_checkpoint_is_named_with_the_command_that_takes_it(command, kind, message, checkpoints):
    if kind not in checkpoints:
        pytest.skip(
            f"a {kind} checkpoint needs MuJoCo (pip install 'entreg[rl]') or transformers and peft ('entreg[t2i]')"
        )
    key = "base_checkpoint" if command == "finetune" else "ckpt_path"
    assert re.search(message, str(refuse(command, key, checkpoints[kind], checkpoints)))


@pytest.mark.parametrize(("command", "key", "takes"), TAKES)
def test_every_command_names_the_command_of_every_other_kind(command, key, takes, checkpoints, tiny_pipeline):
    """entreg-sample, -adapt and -finetune (both routes) refuse each checkpoint kind they do not take, naming its
    command."""
    from entreg.checkpoint_kind import KINDS

    route = ()
    if takes == "grpo_pipeline":
        if tiny_pipeline is None:
            pytest.skip("the text-to-image route needs transformers and peft (pip install 'entreg[t2i]')")
        route = (f"pipeline={tiny_pipeline[0]}", f"prompts={tiny_pipeline[1]}")
    for kind in [kind for kind in KINDS if kind.name != takes and kind.name in checkpoints]:
        message = str(refuse(command, key, checkpoints[kind.name], checkpoints, route))
        assert message.startswith(f"entreg-{command} {key} takes a {takes} (")
        assert message.endswith(f"is a {kind.name} checkpoint ({kind.module}): use it with {kind.command}")


# ---- what each command reports ---------------------------------------------------------------------------------


def scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def printed_row(out: str, label: str) -> list[str]:
    """The cells of the rich table row that starts with ``label``."""
    (line,) = [line for line in out.splitlines() if line[2:].startswith(f"{label} ") and line[0] in "│┃"]
    return [cell.strip() for cell in line.replace("┃", "│").strip("│").split("│")]


def test_train_prints_one_column_per_test_dataloader_named_by_shift(tmp_path, capsys, monkeypatch):
    """Several test dataloaders (one per shift): each column holds its own dataloader's numbers, as the module
    logged them to TensorBoard (test/*/dataloader_idx_i), and the returned metrics are named by shift."""
    from entreg.cli import train

    monkeypatch.setenv("COLUMNS", "200")
    shifts = ["data._target_=entreg.data.ShiftedDigitsDataModule", "+data.shifts=[gaussian_noise,contrast]"]
    overrides = train_overrides(tmp_path, "run", "logger=tensorboard", "trainer.max_epochs=1", *shifts)
    metrics = train(compose("train", *overrides, "+trainer.limit_train_batches=2"))
    out = capsys.readouterr().out
    assert printed_row(out, "metric") == ["metric", "gaussian_noise", "contrast"]
    logged = scalars(tmp_path / "train" / "runs" / "run" / "tensorboard")
    for label, key in [("accuracy", "test/acc"), ("NLL", "test/nll"), ("ECE", "test/ece")]:
        columns = [f"{logged[f'{key}/dataloader_idx_{i}'][-1]:.4f}" for i in (0, 1)]
        assert printed_row(out, label) == [label, *columns]
        assert [f"{metrics[f'{key}/{shift}']:.4f}" for shift in ("gaussian_noise", "contrast")] == columns
    assert printed_row(out, "NLL")[1] != printed_row(out, "NLL")[2]


def test_trainer_ddp_on_the_cpu_runs_without_sync_batchnorm(tmp_path):
    """trainer=ddp asks for SyncBatchNorm, which runs on CUDA only: on the CPU the trainer drops it, with a warning."""
    import lightning as L
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DDPStrategy

    from entreg.cli import make_trainer

    accelerators = ["cpu", *(["auto"] if not torch.cuda.is_available() else [])]
    for accelerator in accelerators:
        cfg = compose("train", "trainer=ddp", "trainer.devices=2", f"trainer.accelerator={accelerator}",
                      f"paths.output_dir={tmp_path}")  # fmt: skip
        with pytest.warns(UserWarning, match="running with trainer.accelerator=cpu trainer.sync_batchnorm=false"):
            trainer: L.Trainer = make_trainer(cfg, [], [])
        assert isinstance(trainer.accelerator, CPUAccelerator) and isinstance(trainer.strategy, DDPStrategy)
        assert trainer.num_devices == 2 and trainer.strategy._layer_sync is None  # no SyncBatchNorm conversion


def test_entreg_sample_writes_tensorboard_and_prints_where(checkpoints, tmp_path, capsys):
    """The sample histogram as an image and every metric as a scalar (the values metrics.json holds)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from entreg.cli import sample

    cfg = compose("sample", f"ckpt_path={checkpoints['diffusion']}", f"paths.output_dir={tmp_path}", "n=16",
                  "num_inference_steps=2", "data=gmm2d", "data.n_val=16")  # fmt: skip
    metrics = sample(cfg)
    out = capsys.readouterr().out
    paths = {"samples": tmp_path / "samples.png", "metrics": tmp_path / "metrics.json"}
    paths |= {"TensorBoard logs": tmp_path / "tensorboard", "checkpoint": checkpoints["diffusion"]}
    for label, path in paths.items():
        assert f"{label}: {path}" in out
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["sample/samples"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {"log_likelihood", "sliced_wasserstein", "finite_fraction"} <= set(metrics)
    for name in metrics:
        assert [e.value for e in events.Scalars(f"sample/{name}")] == [pytest.approx(written[name], rel=1e-6)]


@pytest.mark.slow
def test_trainer_ddp_trains_on_two_cpu_processes(tmp_path):
    """trainer=ddp without a GPU, end to end: Lightning starts the second process; no SyncBatchNorm error."""
    args = [str(ENTRY), "trainer=ddp", "trainer.devices=2", "trainer.fast_dev_run=true", "callbacks.progress_bar=null"]
    result = run([*args, "data.size=8", "logger=csv"], cwd=tmp_path, ENTREG_LOG_DIR=str(tmp_path / "logs"))
    assert "running with trainer.accelerator=cpu trainer.sync_batchnorm=false" in result.stderr
    assert "accuracy" in result.stdout and "GLOBAL_RANK: 1" in result.stdout + result.stderr
