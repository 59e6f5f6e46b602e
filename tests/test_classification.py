"""ClassificationModule: loss terms, NaN batches, TensorBoard output, checkpoints."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from entreg.entropy import categorical_entropy
from entreg.modules import ClassificationModule


def tiny_model(**kwargs) -> ClassificationModule:
    defaults = {"backbone": "small_cnn", "num_classes": 4, "in_chans": 1, "backbone_kwargs": {"widths": (4, 8)}}
    return ClassificationModule(**{**defaults, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**options, **kwargs})


def loader(n_batches: int = 4, nan_batch: int | None = None, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * batch_size, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n_batches * batch_size,), generator=g)
    if nan_batch is not None:
        x[nan_batch * batch_size] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        same = torch.equal(value, b[name]) if isinstance(value, torch.Tensor) else value == b[name]
        assert same, name


def test_loss_terms():
    logits = torch.randn(6, 4)
    target = torch.randint(0, 4, (6,))
    h = categorical_entropy(logits)
    loss, entropy = tiny_model(label_smoothing=0.1).compute_loss(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
    torch.testing.assert_close(entropy, h)
    loss, _ = tiny_model(confidence_penalty=0.3).compute_loss(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target) - 0.3 * h.mean())
    loss, _ = tiny_model(confidence_penalty=0.3, confidence_hinge=1.0).compute_loss(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target) + 0.3 * (1.0 - h).clamp(min=0).mean())


def test_era_output_keeps_the_entropy_floor_at_eval():
    model = tiny_model(output_activation="era", output_activation_kwargs={"target_entropy": 0.8}).eval()
    out = model(torch.randn(16, 1, 8, 8) * 100)
    assert (categorical_entropy(out) >= 0.8).all()


def test_non_finite_loss_skips_the_step_and_equals_training_without_that_batch(tmp_path):
    torch.manual_seed(0)
    with_nan = tiny_model()
    without = copy.deepcopy(with_nan)
    with pytest.warns(UserWarning, match="Non-finite training loss"):
        trainer(tmp_path).fit(with_nan, loader(nan_batch=1))
    clean = loader().dataset
    kept = torch.utils.data.Subset(clean, [i for i in range(len(clean)) if not 8 <= i < 16])  # batch 1 left out
    trainer(tmp_path).fit(without, DataLoader(kept, batch_size=8))
    assert with_nan.skipped_steps == 1
    assert_same_state(with_nan.state_dict(), without.state_dict())


def test_all_nan_batches_leave_the_weights_untouched(tmp_path):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    data = loader()
    data.dataset.tensors[0][:] = float("nan")
    with pytest.warns(UserWarning, match="batch skipped"):
        trainer(tmp_path).fit(model, data)
    assert model.skipped_steps == 4
    assert_same_state(model.state_dict(), before)  # weights and BatchNorm statistics alike


def test_tensorboard_scalars_and_validation_entropy_histogram(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    model = tiny_model()
    trainer(tmp_path, logger=logger, max_epochs=2, log_every_n_steps=1).fit(model, loader(), loader(n_batches=3))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss_step", "train/acc", "val/acc", "val/nll", "val/ece", "val/entropy_mean", "val/entropy_max"):
        assert tag in scalars, (tag, scalars)
    histograms = events.Histograms("val/entropy_hist")
    assert len(histograms) == 2  # one per validation epoch (not the sanity check)
    assert histograms[-1].histogram_value.num == 24  # every validation sample
    mean = histograms[-1].histogram_value.sum / 24
    assert mean == pytest.approx(events.Scalars("val/entropy_mean")[-1].value, rel=1e-5)


def test_checkpoint_reloads_with_weights_only(tmp_path):
    model = tiny_model(output_activation="era", output_activation_kwargs={"target_entropy": 0.5})
    fit = trainer(tmp_path, enable_checkpointing=True)
    fit.fit(model, loader())
    model.output_activation.target_entropy = 0.9  # e.g. moved by a controller during training
    fit.save_checkpoint(tmp_path / "model.ckpt")
    restored = ClassificationModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert restored.output_activation.target_entropy == 0.9
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown output activation 'softmax'; valid: none, era"):
        tiny_model(output_activation="softmax")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        tiny_model(label_smoothing=1.5)
    with pytest.raises(ValueError, match="coef must be >= 0"):
        tiny_model(confidence_penalty=-1.0)
    with pytest.raises(ValueError, match="coef must be >= 0"):  # also when a controller sets it later
        tiny_model().confidence_penalty.coef = -0.5
    with pytest.raises(ValueError, match="out of range for 4 classes"):
        tiny_model(output_activation="era", output_activation_kwargs={"target_entropy": 5.0})


class _NaNOnRankOne(torch.utils.data.Dataset):
    """16 samples; sample 9 is NaN: with ``_RankInterleaved`` only rank 1 sees a NaN, in global batch 1."""

    def __init__(self, nan_index: int | None = 9) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (16,), generator=g)
        if nan_index is not None:
            self.x[nan_index] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _RankInterleaved(torch.utils.data.Sampler):
    """Rank r reads samples r, r+2, r+4, ...: global batch k is samples 8k..8k+7 (batch 4 per rank)."""

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank, 16, 2))

    def __len__(self) -> int:
        return 8


class _CheckRanksAgree(L.Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        assert pl_module.skipped_steps == trainer.max_epochs  # both ranks skipped the poisoned batch each epoch
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        assert torch.isfinite(flat).all()
        gathered = pl_module.all_gather(flat)
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)


def test_nan_on_one_rank_is_skipped_on_all_ranks_under_ddp(tmp_path):
    torch.manual_seed(0)
    groupnorm = {"backbone_kwargs": {"widths": (4, 8), "norm": "group"}}  # no batch statistics: DDP == 1 process
    ddp_model = tiny_model(**groupnorm)
    single = copy.deepcopy(ddp_model)
    ddp = trainer(
        tmp_path,
        devices=2,
        strategy="ddp_fork",
        max_epochs=2,
        callbacks=[_CheckRanksAgree()],
        use_distributed_sampler=False,
    )
    ddp.fit(ddp_model, DataLoader(_NaNOnRankOne(), batch_size=4, sampler=_RankInterleaved()))
    # one process on the same global batches (8 = 2 ranks x 4), without the poisoned one
    clean = _NaNOnRankOne(nan_index=None)
    kept = torch.utils.data.Subset(clean, list(range(8)))  # global batch 0 only
    trainer(tmp_path, max_epochs=2).fit(single, DataLoader(kept, batch_size=8))
    for (name, a), b in zip(ddp_model.state_dict().items(), single.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
