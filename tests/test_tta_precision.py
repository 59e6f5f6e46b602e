"""TestTimeAdaptation under the trainer's mixed precision and with channels_last: the adaptation step's forward
runs in bfloat16 (autocast) or channels_last as asked, and the online predictions stay those of float32."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from entreg.callbacks import TestTimeAdaptation


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 5),
        )  # fmt: skip
        self.seen: list[tuple[torch.dtype, bool]] = []
        self.net[0].register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def test_step(self, batch, batch_idx):
        pass


def adapt(precision: str = "32-true", **kwargs) -> tuple[Net, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 5, (48,), generator=g))
    model, logits = Net(), []

    class Keep(L.Callback):
        def on_test_batch_end(self, trainer, *args) -> None:
            logits.append(tta.last_logits)

    tta = TestTimeAdaptation("tent", num_classes=5, lr=1e-2, **kwargs)
    trainer = L.Trainer(accelerator="cpu", precision=precision, callbacks=[tta, Keep()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.test(model, DataLoader(data, batch_size=16), verbose=False)
    return model, logits


def test_bf16_mixed_autocasts_the_adaptation_and_keeps_float32_logits():
    full, full_logits = adapt()
    mixed, mixed_logits = adapt("bf16-mixed")
    assert {dtype for dtype, _ in full.seen} == {torch.float32}
    assert {dtype for dtype, _ in mixed.seen} == {torch.bfloat16}  # the adaptation step ran under autocast
    for a, b in zip(full_logits, mixed_logits, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)  # bfloat16 rounding, same predictions
        assert torch.equal(a.argmax(1), b.argmax(1))


def test_channels_last_converts_model_and_batches_with_the_same_results():
    plain, plain_logits = adapt()
    fast, fast_logits = adapt(channels_last=True)
    assert not any(channels_last for _, channels_last in plain.seen)
    assert all(channels_last for _, channels_last in fast.seen)
    for a, b in zip(plain_logits, fast_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_channels_last_must_be_a_flag():
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        TestTimeAdaptation("tent", channels_last="yes")
