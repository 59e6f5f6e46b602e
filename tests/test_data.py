"""DataModules: the bundled digits split, image folders, CIFAR-10 layout, and clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from entreg.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule


def test_digits_split_is_stratified_seeded_and_disjoint():
    dm = DigitsDataModule(size=8)
    dm.setup("fit")
    sets = [dm.train_set, dm.val_set, dm.test_set]
    assert [len(s) for s in sets] == [1000, 200, 597]
    for s in sets:  # stratified: every class has about 1/10 of each split
        counts = torch.bincount(s.tensors[1], minlength=10).float() / len(s)
        assert counts.min() > 0.08 and counts.max() < 0.12
    images = torch.cat([s.tensors[0].flatten(1) for s in sets])
    assert torch.unique(images, dim=0).shape[0] >= 1790  # no image in two splits (a few digits are duplicates)
    again = DigitsDataModule(size=8)
    again.setup("fit")
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0])
    other = DigitsDataModule(size=8, seed=1)
    other.setup("fit")
    assert not torch.equal(other.test_set.tensors[1], dm.test_set.tensors[1])


def test_digits_size_channels_and_standardisation():
    dm = DigitsDataModule(size=32, channels=3, batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long
    train = dm.train_set.tensors[0]
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-3
    assert torch.equal(x[:, 0], x[:, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 4}, "size must be >= 8"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"split": (1000, 200, 500)}, "summing to 1797"),
        ({"num_classes": 5}, "has 10 classes"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_missing_data_directories_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found: .*cifar-10-batches-py.*download=true"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"Training images not found: .*<data_dir>/train/<class>"):
        ImageFolderDataModule(data_dir=str(tmp_path / "nowhere"), num_classes=3)


def write_image_folder(root, classes: int = 3, per_class: int = 4) -> None:
    """A tiny ImageFolder tree of real digit images saved as PNG files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            images = digits.images[digits.target == c][:per_class]
            for i, image in enumerate(images):
                Image.fromarray((image * 15).astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=4 but .* has 3 class folders"):
        ImageFolderDataModule(str(tmp_path), num_classes=4)
    dm = ImageFolderDataModule(str(tmp_path), num_classes=3, image_size=16, channels=1, batch_size=5, num_workers=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 16, 16) and len(dm.test_set) == 12  # no test/ folder: val is the test set
    assert set(y.tolist()) <= {0, 1, 2}


def write_fake_cifar10(root, per_batch: int = 20) -> None:
    """Random images in torchvision's CIFAR-10 pickle layout (the real files are 170 MB)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
            "labels": list(range(10)) * (per_batch // 10),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_layout_and_split(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    write_fake_cifar10(tmp_path)
    # the fake files have other checksums than the real ones
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8, num_workers=0, val_size=10)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, 20)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)


def test_image_folder_labels_follow_the_training_classes(tmp_path):
    import shutil

    write_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "val" / "class_1")  # val lacks a class: class_2 must keep label 2
    dm = ImageFolderDataModule(str(tmp_path), num_classes=3, image_size=8, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.val_set.class_to_idx == dm.train_set.class_to_idx
    assert sorted({label for _, label in dm.val_set.samples}) == [0, 2]
    (tmp_path / "val" / "class_9").mkdir()
    (tmp_path / "val" / "class_1").mkdir()
    with pytest.raises(ValueError, match=r"class folders that the training split lacks: \['class_9'\]"):
        ImageFolderDataModule(str(tmp_path), num_classes=3).setup("fit")
