"""PredictiveEntropy and ClassificationMetrics, alone and synchronised over 2 DDP processes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from entreg.entropy import categorical_entropy
from entreg.metrics import ClassificationMetrics, PredictiveEntropy


def test_mean_min_max_over_batches():
    z = torch.randn(30, 5) * 3
    h = categorical_entropy(z)
    metric = PredictiveEntropy()
    for chunk in z.split(7):
        metric.update(chunk)
    out = metric.compute()
    torch.testing.assert_close(out["mean"], h.mean())
    assert out["min"] == h.min() and out["max"] == h.max()
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        assert torch.isnan(metric.compute()["mean"])


@pytest.mark.parametrize("input_format", ["probs", "entropy"])
def test_other_input_formats_agree_with_logits(input_format):
    z = torch.randn(12, 4)
    reference = PredictiveEntropy()
    reference.update(z)
    metric = PredictiveEntropy(input_format=input_format)
    metric.update(z.softmax(-1) if input_format == "probs" else categorical_entropy(z))
    for key, value in reference.compute().items():
        torch.testing.assert_close(metric.compute()[key], value)


def test_bad_input_format():
    with pytest.raises(ValueError, match="'logits', 'probs' or 'entropy'"):
        PredictiveEntropy(input_format="log_probs")


def test_classification_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.5]])
    target = torch.tensor([0, 0, 0, 1])
    metrics = ClassificationMetrics(num_classes=2, ece_bins=10)
    metrics.update(logits, target)
    out = metrics.compute()
    p = logits.softmax(-1)
    assert out["acc"].item() == pytest.approx(0.75)
    assert out["nll"].item() == pytest.approx(-p[torch.arange(4), target].log().mean().item(), rel=1e-6)
    conf, pred = p.max(-1)
    # every sample falls in its own confidence bin here, so ECE = mean |conf - correct|
    assert out["ece"].item() == pytest.approx((conf - (pred == target).float()).abs().mean().item(), rel=1e-5)
    assert out["entropy_max"].item() == pytest.approx(categorical_entropy(logits).max().item())


GLOBAL_LOGITS = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)) * 4
GLOBAL_TARGET = torch.randint(0, 6, (16,), generator=torch.Generator().manual_seed(1))


class _EvaluateGivenLogits(L.LightningModule):
    """Feeds fixed logits into the metrics; the assertions run on every DDP worker."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.entropy = PredictiveEntropy()
        self.metrics = ClassificationMetrics(num_classes=6)

    def test_step(self, batch, batch_idx):
        index = batch[0]
        self.entropy.update(GLOBAL_LOGITS[index])
        self.metrics.update(GLOBAL_LOGITS[index], GLOBAL_TARGET[index])

    def on_test_epoch_end(self) -> None:
        assert self.trainer.world_size == 2
        single = PredictiveEntropy()
        single.update(GLOBAL_LOGITS)
        for key, value in single.compute().items():
            torch.testing.assert_close(self.entropy.compute()[key], value)
        reference = ClassificationMetrics(num_classes=6)
        reference.update(GLOBAL_LOGITS, GLOBAL_TARGET)
        for key, value in reference.compute().items():
            torch.testing.assert_close(self.metrics.compute()[key], value)
        self.log("checked", 1.0)


def test_metrics_sync_over_two_processes_equal_one_process():
    loader = DataLoader(TensorDataset(torch.arange(16)), batch_size=3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(_EvaluateGivenLogits(), loader, verbose=False)
    assert trainer.callback_metrics["checked"] == 1.0
