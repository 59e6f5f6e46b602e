"""Distribution shifts of the digits test split, for test-time adaptation: seeded, in torch, or digits-C.

The torch shifts (:mod:`entreg.data.torch_shifts`) follow ImageNet-C's families at five severities (pixel values
in [0, 1]); they are simple stand-ins for the benchmark's corruptions, computed on the fly with no extra package.
The real ImageNet-C corruptions (digits-C, :mod:`entreg.data.digits_c`) are generated once and cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from entreg.data.digits import DigitsDataModule
from entreg.data.digits_c import MIN_SIZE, DigitsCCache, corruption_names
from entreg.data.torch_shifts import SHIFTS, apply_shift

__all__ = ["SHIFTS", "ShiftedDigitsDataModule", "apply_shift"]


class ShiftedDigitsDataModule(DigitsDataModule):
    """The digits test split under shifts: one test dataloader per shift (so that a per-shift reset
    sees each shift separately) or, with ``mixed=True``, one shuffled stream of all of them.

    Training and validation data are the clean digits, as for :class:`DigitsDataModule`; every
    shifted stream is standardised with the clean training images' mean and std.

    Args:
        shifts: names from :data:`SHIFTS`, or with ``backend="imagecorruptions"`` from
            :func:`~entreg.data.digits_c.corruption_names` (the 15 common corruptions and 4 validation ones).
        severity: 1-5.
        mixed: one stream mixing all shifts.
        class_sorted: order each stream by label (SAR's label-shift scenario) instead of shuffling.
        test_batch_size: batch size of the test streams (default: ``batch_size``).
        backend: ``"torch"``: :func:`apply_shift` on the fly; ``"imagecorruptions"``: digits-C from a
            :class:`~entreg.data.digits_c.DigitsCCache` (needs ``pip install entreg[corruptions]`` and
            ``size`` >= 32; generated on first use, by ``prepare_data`` under a Trainer, seeded by ``seed``).
        cache_dir: the digits-C cache folder (default :func:`~entreg.data.digits_c.default_cache_dir`).
        **kwargs: :class:`DigitsDataModule` arguments (``size``, ``channels``, ``batch_size``, ``seed``...).

    Example:
        >>> dm = ShiftedDigitsDataModule(shifts=["gaussian_noise", "contrast"], size=8)
        >>> dm.setup("test")
        >>> [len(loader.dataset) for loader in dm.test_dataloader()]
        [597, 597]
    """

    def __init__(
        self,
        shifts: Sequence[str] = ("gaussian_noise", "contrast", "gaussian_blur"),
        severity: int = 5,
        mixed: bool = False,
        class_sorted: bool = False,
        test_batch_size: int | None = None,
        backend: str = "torch",
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        valid = corruption_names(backend)
        bad = [s for s in shifts if s not in valid]
        if bad or not shifts:
            raise ValueError(f"shifts must be a non-empty list of {valid}, got {list(shifts)}")
        if severity not in range(1, 6):
            raise ValueError(f"severity must be 1..5, got {severity}")
        if backend != "torch" and self.size < MIN_SIZE:
            raise ValueError(f"backend={backend!r} needs size >= {MIN_SIZE}, got {self.size}")
        self.shifts, self.severity, self.mixed, self.class_sorted = list(shifts), severity, mixed, class_sorted
        self.backend, self.cache_dir = backend, cache_dir
        self.test_batch_size = test_batch_size or self.batch_size
        self.shifted_sets: list[TensorDataset] = []

    def prepare_data(self) -> None:
        """Generate missing digits-C sets once per node (Lightning calls this before every rank's ``setup``)."""
        if self.backend != "torch":
            self.setup("test")

    def _shifted_images(self, clean: Tensor, generator: torch.Generator) -> list[Tensor]:
        """``clean`` (N, C, H, W) in [0, 1] under each shift: torch's drawn from ``generator``, or digits-C."""
        if self.backend == "torch":
            return [apply_shift(clean, s, self.severity, generator) for s in self.shifts]
        cache = DigitsCCache(self.cache_dir, self.backend)
        source = {"data": "digits", "size": self.size, "split": list(self.split), "split_seed": self.seed}
        grey = clean[:, 0].clamp(0.0, 1.0)  # undoing the standardisation leaves float rounding outside [0, 1]
        return [
            (torch.from_numpy(cache.get(grey, s, self.severity, self.seed, source)).float() / 255)
            .unsqueeze(1)
            .expand(-1, self.channels, -1, -1)
            for s in self.shifts
        ]

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.shifted_sets:
            return
        mean, std = self.normalization
        images, labels = self.test_set.tensors
        clean = images * std + mean
        g = torch.Generator().manual_seed(self.seed)
        sets = [(x - mean) / std for x in self._shifted_images(clean, g)]
        if self.mixed:
            x, y = torch.cat(sets), labels.repeat(len(sets))
            order = torch.randperm(len(y), generator=g)
            self.shifted_sets = [TensorDataset(x[order], y[order])]
        else:
            self.shifted_sets = []
            for x in sets:
                order = (
                    torch.argsort(labels, stable=True)
                    if self.class_sorted
                    else torch.randperm(len(labels), generator=g)
                )
                self.shifted_sets.append(TensorDataset(x[order], labels[order]))

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(d, batch_size=self.test_batch_size, shuffle=False) for d in self.shifted_sets]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
