"""Image data sets that users keep on disk: CIFAR-10 and any ImageFolder tree. Nothing is
downloaded unless the user asks for it (``download`` on CIFAR-10 only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from entreg.data.base import SplitDataModule

__all__ = ["CIFAR10DataModule", "ImageFolderDataModule"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _FolderWithClasses(ImageFolder):
    """An ImageFolder labelled with a given class list (the training split's), so that a split
    missing a class does not shift the labels of the others."""

    def __init__(self, root: Path, classes: list[str], transform: Callable | None) -> None:
        self._given_classes = list(classes)
        super().__init__(str(root), transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = sorted(p.name for p in Path(directory).iterdir() if p.is_dir())
        unknown = sorted(set(present) - set(self._given_classes))
        if unknown:
            raise ValueError(f"{directory} has class folders that the training split lacks: {unknown}")
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is not a directory. {hint}")


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 from torchvision's python-pickle folder ``<data_dir>/cifar-10-batches-py``.

    The 50,000 training images are split (seeded) into train and ``val_size`` validation
    images; the 10,000 test images are the test set. Training images get the usual random crop
    (padding 4) and horizontal flip when ``augment`` is on.

    Args:
        data_dir: folder that holds ``cifar-10-batches-py``.
        download: fetch it when missing (needs a network; off by default).

    Example (needs the data on disk)::

        dm = CIFAR10DataModule(data_dir="~/data/cifar10")
    """

    num_classes = 10
    channels = 3

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        num_workers: int = 2,
        val_size: int = 5000,
        augment: bool = True,
        download: bool = False,
        seed: int = 0,
        num_classes: int = 10,
        channels: int = 3,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if (num_classes, channels) != (10, 3):
            raise ValueError(
                f"CIFAR-10 has 10 classes and 3 channels, got num_classes={num_classes}, channels={channels}"
            )
        if not 0 < val_size < 50000:
            raise ValueError(f"val_size must be in (0, 50000), got {val_size}")
        self.data_dir = Path(data_dir).expanduser()
        if not download:
            _require_dir(
                self.data_dir / "cifar-10-batches-py",
                "CIFAR-10",
                f"Put torchvision's 'cifar-10-batches-py' folder under data_dir={str(self.data_dir)!r}, "
                "or set download=true (needs a network).",
            )
        self.val_size, self.augment, self.download = val_size, augment, download

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.data_dir, train=True, download=self.download)
            CIFAR10(self.data_dir, train=False, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T
        from torchvision.datasets import CIFAR10

        plain = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        augmented = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        train_full = CIFAR10(self.data_dir, train=True, transform=T.Compose(augmented + plain))
        val_full = CIFAR10(self.data_dir, train=True, transform=T.Compose(plain))
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train_full, order[self.val_size :])
        self.val_set = Subset(val_full, order[: self.val_size])
        self.test_set = CIFAR10(self.data_dir, train=False, transform=T.Compose(plain))


class ImageFolderDataModule(SplitDataModule):
    """Any image classification tree: ``<data_dir>/train/<class>/*.png``, ``<data_dir>/val/...``
    and optionally ``<data_dir>/test/...`` (the val split is used for testing when absent).

    Training images get a random resized crop and flip when ``augment`` is on; evaluation
    images are resized and centre-cropped to ``image_size``.

    Args:
        data_dir: root of the tree.
        image_size: side of the square crop fed to the model.
        num_classes: expected number of class folders (checked at construction).
        channels: 3 (RGB) or 1 (converted to greyscale).
        mean, std: per-channel normalisation; ImageNet's by default.
        seed: seed of the training order.

    Example (needs images on disk)::

        dm = ImageFolderDataModule(data_dir="~/data/imagenette", image_size=160, num_classes=10)
    """

    def __init__(
        self,
        data_dir: str,
        num_classes: int,
        image_size: int = 224,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 2,
        augment: bool = True,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if mean is None or std is None:  # ImageNet statistics (their grey average for 1 channel)
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        self.data_dir = Path(data_dir).expanduser()
        layout = "Expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image>."
        _require_dir(self.data_dir / "train", "Training images", layout)
        _require_dir(self.data_dir / "val", "Validation images", layout)
        classes = sorted(p.name for p in (self.data_dir / "train").iterdir() if p.is_dir())
        if len(classes) != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but {self.data_dir / 'train'} has {len(classes)} class folders"
            )
        self.num_classes, self.channels, self.image_size, self.augment = num_classes, channels, image_size, augment
        self.mean, self.std = tuple(mean), tuple(std)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T

        grey = [T.Grayscale(1)] if self.channels == 1 else []
        plain = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        resize = [T.Resize(self.image_size), T.CenterCrop(self.image_size)]
        train_crop = [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()] if self.augment else resize
        test_dir = self.data_dir / "test" if (self.data_dir / "test").is_dir() else self.data_dir / "val"
        self.train_set = ImageFolder(self.data_dir / "train", T.Compose(grey + train_crop + plain))
        classes = self.train_set.classes
        self.val_set = _FolderWithClasses(self.data_dir / "val", classes, T.Compose(grey + resize + plain))
        self.test_set = _FolderWithClasses(test_dir, classes, T.Compose(grey + resize + plain))
