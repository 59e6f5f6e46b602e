"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) as a DataModule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from entreg.data.base import SplitDataModule

__all__ = ["DigitsDataModule", "load_digits_tensors"]

NUM_IMAGES = 1797
SCALES = ("standard", "minus_one_one")


def load_digits_tensors(size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images in [0, 1] of shape (N, channels, size, size) and labels (N,).

    The 8x8 originals are upsampled bilinearly when ``size`` > 8 (32 is the usual choice for
    image models and corruptions).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return images.expand(-1, channels, -1, -1).contiguous(), torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(SplitDataModule):
    """Bundled digits with a seeded, stratified train/val/test split (default 1000/200/597).

    Needs no download; everything is held in memory as tensors. Images are standardised with the
    training split's mean and std (``scale="standard"``), or mapped to [-1, 1] as ``2 x - 1`` of the
    [0, 1] images (``scale="minus_one_one"``, for diffusion models).

    Args:
        size: image side (8 = original; >= 8).
        channels: 1, or 3 (grey replicated) for RGB backbones.
        batch_size: per-process batch size.
        split: (train, val, test) sizes summing to 1,797.
        seed: seed of the split and of the training order (independent of the training seed).
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        num_classes: always 10; accepted so that configs can read ``data.num_classes``.
        scale: ``"standard"`` (zero mean, unit std) or ``"minus_one_one"``.

    Example:
        >>> dm = DigitsDataModule(size=8, batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.train_set), len(dm.val_set)
        ((32, 1, 8, 8), 1000, 200)
    """

    def __init__(
        self,
        size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        split: tuple[int, int, int] = (1000, 200, 597),
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int = 10,
        scale: str = "standard",
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if size < 8:
            raise ValueError(f"digits size must be >= 8 (the originals are 8x8), got {size}")
        if channels not in (1, 3):
            raise ValueError(f"digits channels must be 1 or 3, got {channels}")
        split = tuple(int(s) for s in split)
        if len(split) != 3 or sum(split) != NUM_IMAGES or min(split) < 10:
            raise ValueError(
                f"split must be 3 sizes (train, val, test), each >= 10, summing to {NUM_IMAGES}; got {split}"
            )
        if num_classes != 10:
            raise ValueError(f"the digits data set has 10 classes, got num_classes={num_classes}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.save_hyperparameters()
        self.size, self.channels, self.split, self.num_classes = size, channels, split, num_classes
        self.scale = scale

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_tensors(self.size, self.channels)
        index = torch.arange(NUM_IMAGES).numpy()
        n_train, n_val, _ = self.split
        train_idx, rest = train_test_split(index, train_size=n_train, stratify=labels, random_state=self.seed)
        val_idx, test_idx = train_test_split(rest, train_size=n_val, stratify=labels[rest], random_state=self.seed)
        if self.scale == "minus_one_one":  # (x - 0.5) / 0.5 = 2 x - 1
            mean, std = torch.tensor(0.5), torch.tensor(0.5)
        else:
            mean, std = images[train_idx].mean(), images[train_idx].std()
        self.normalization = (float(mean), float(std))  # of the [0, 1] images: shifted copies reuse it
        images = (images - mean) / std
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(images[idx], labels[idx]) for idx in (train_idx, val_idx, test_idx)
        )
