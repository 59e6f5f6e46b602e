"""CIFAR-10-C/-100-C streams on small files in the published layout: severity slicing, labels, the first-k subset,
mariodoebler's shuffle, loaders with worker processes, transforms, and errors that name the damaged file."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from entreg.data import COMMON_CORRUPTIONS, CIFAR10CDataModule, CIFAR100CDataModule, Domain, stream_order
from tests.stream_fixtures import cifar_source, write_cifar_c

N = 6  # images per severity (10,000 in the release)
TWO = ["gaussian_noise", "fog"]
# RobustBench's CORRUPTIONS tuple (robustbench/data.py): the same 15 in another order
ROBUSTBENCH_ORDER = (
    "shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness", "fog",
    "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression", "elastic_transform",
)  # fmt: skip


@pytest.fixture
def cifar10_c(tmp_path):
    root = tmp_path / "CIFAR-10-C"
    labels, arrays = write_cifar_c(root, COMMON_CORRUPTIONS, N)
    return root, labels, arrays


def stream(root, **kwargs) -> CIFAR10CDataModule:
    dm = CIFAR10CDataModule(root, **{"num_workers": 0, "shuffle": False, **kwargs})
    dm.setup("test")
    return dm


def test_default_is_the_15_corruptions_in_the_standard_order_at_severity_5(cifar10_c):
    root, _, _ = cifar10_c
    dm = stream(root)
    assert [d.name for d in dm.domains] == [f"{c}_5" for c in COMMON_CORRUPTIONS]
    assert [(d.corruption, d.severity) for d in dm.domains] == [(c, 5) for c in COMMON_CORRUPTIONS]
    assert list(COMMON_CORRUPTIONS[:3]) == ["gaussian_noise", "shot_noise", "impulse_noise"]
    assert COMMON_CORRUPTIONS[-1] == "jpeg_compression" and len(set(COMMON_CORRUPTIONS)) == 15
    assert set(COMMON_CORRUPTIONS) == set(ROBUSTBENCH_ORDER) and COMMON_CORRUPTIONS != ROBUSTBENCH_ORDER
    assert all(isinstance(d, Domain) for d in dm.domains) and dm.num_classes == 10 and dm.class_subset is None


def test_severity_s_is_rows_s_minus_1_n_to_s_n_with_their_labels(cifar10_c):
    root, labels, arrays = cifar10_c
    dm = stream(root, corruptions=TWO, severities=[1, 2, 3, 4, 5])
    assert [d.name for d in dm.domains] == [f"{c}_{s}" for c in TWO for s in range(1, 6)]
    for domain in dm.domains:
        k, s = COMMON_CORRUPTIONS.index(domain.corruption), domain.severity
        assert domain.dataset.rows == list(range((s - 1) * N, s * N))
        assert domain.dataset.targets == labels.tolist()
        for i in range(N):
            image, label = domain.dataset[i]
            assert cifar_source(image) == (k, s, (s - 1) * N + i) and label == labels[i]
            expected = torch.from_numpy(arrays[domain.corruption][(s - 1) * N + i]).permute(2, 0, 1).float() / 255
            assert image.dtype == torch.float32 and torch.equal(image, expected)  # ToTensor: uint8 / 255 exactly


def test_labels_of_one_block_are_accepted(cifar10_c):
    root, labels, _ = cifar10_c
    np.save(root / "labels.npy", labels.astype(np.int64))  # n labels instead of 5 n
    dm = stream(root, corruptions=["fog"], severities=[3])
    assert dm.domains[0].dataset.targets == labels.tolist() and dm.domains[0].dataset.rows[0] == 2 * N


def test_first_k_then_mariodoebler_shuffle_the_same_for_every_domain(cifar10_c):
    root, labels, _ = cifar10_c
    dm = stream(root, corruptions=TWO, severities=[2, 5], n_examples=4, shuffle=True, seed=3)
    expected = list(range(4))
    state = random.getstate()
    random.seed(3)
    random.shuffle(expected)  # mariodoebler's get_test_loader: random.seed(seed); random.shuffle(samples)
    random.setstate(state)
    for domain in dm.domains:
        s = domain.severity
        assert domain.dataset.rows == [(s - 1) * N + i for i in expected]
        assert domain.dataset.targets == [int(labels[i]) for i in expected]
    other = stream(root, corruptions=["fog"], n_examples=4, shuffle=True, seed=4).domains[0].dataset.rows
    assert sorted(other) == sorted(dm.domains[1].dataset.rows) and other != dm.domains[1].dataset.rows
    assert stream_order(N, shuffle=True, seed=3) != list(range(N))


def test_cifar100_c_has_100_classes_and_checks_labels(tmp_path):
    root = tmp_path / "CIFAR-100-C"
    labels, _ = write_cifar_c(root, ["fog"], N, num_classes=100, seed=1)
    dm = CIFAR100CDataModule(root, corruptions=["fog"], num_workers=0, shuffle=False)
    dm.setup()
    assert dm.num_classes == 100 and dm.domains[0].dataset.targets == labels.tolist()
    np.save(root / "labels.npy", np.tile(np.arange(N) + 95, 5))  # 95..100: 100 is out of range
    with pytest.raises(ValueError, match=r"labels\.npy: labels must be in 0\.\.99"):
        CIFAR100CDataModule(root, corruptions=["fog"], num_workers=0).setup()
    with pytest.raises(ValueError, match="CIFAR-100-C has 100 classes"):
        CIFAR100CDataModule(root, num_classes=10)


def test_loaders_with_worker_processes_give_the_same_batches(cifar10_c):
    root, _, _ = cifar10_c
    serial = stream(root, corruptions=TWO, batch_size=4)
    parallel = stream(root, corruptions=TWO, batch_size=4, num_workers=2, persistent_workers=True, pin_memory=False)
    assert parallel.loader_options() == {
        "batch_size": 4,
        "num_workers": 2,
        "pin_memory": False,
        "persistent_workers": True,
    }
    assert serial.loader_options()["persistent_workers"] is False  # no workers, nothing to keep
    dataset = parallel.domains[0].dataset
    dataset[0]  # opens the memory map in this process
    assert len(pickle.dumps(dataset)) < 2000  # what a spawned worker receives: the path and rows, not the images
    for a, b in zip(serial.test_dataloader(), parallel.test_dataloader(), strict=True):
        assert not a.pin_memory and b.num_workers == 2 and b.persistent_workers
        batches_a, batches_b = list(a), list(b)
        assert [len(x) for x, _ in batches_a] == [4, 2]
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.long
    assert serial.shifts == ["gaussian_noise_5", "fog_5"]  # what entreg-adapt names its rows by


def test_set_transform_replaces_to_tensor_before_and_after_setup(cifar10_c):
    root, _, _ = cifar10_c
    dm = CIFAR10CDataModule(root, corruptions=["fog"], num_workers=0)
    dm.set_transform(T.Compose([T.Resize(64), T.ToTensor()]))
    dm.setup()
    assert dm.domains[0].dataset[0][0].shape == (3, 64, 64)
    dm.set_transform(T.Compose([T.CenterCrop(16), T.ToTensor()]))
    assert dm.domains[0].dataset[0][0].shape == (3, 16, 16)
    dm.set_transform(None)  # back to ToTensor
    assert dm.domains[0].dataset[0][0].shape == (3, 32, 32) and not dm.cropped


# ---- errors that name what is wrong -----------------------------------------------------------------------------


def test_a_missing_corruption_file_or_root_is_named(cifar10_c, tmp_path):
    root, _, _ = cifar10_c
    (root / "frost.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10-C: missing .*frost\.npy.*zenodo\.org/records/2535967"):
        CIFAR10CDataModule(root)
    CIFAR10CDataModule(root, corruptions=["fog"])  # the others are fine
    with pytest.raises(FileNotFoundError, match=r"root='.*nowhere' is not a directory"):
        CIFAR10CDataModule(tmp_path / "nowhere")


def test_a_truncated_or_foreign_npy_is_named(cifar10_c):
    root, _, _ = cifar10_c
    fog = root / "fog.npy"
    fog.write_bytes(fog.read_bytes()[: fog.stat().st_size // 2])  # cut short (an interrupted download)
    with pytest.raises(ValueError, match=r"cannot read .*fog\.npy .*uint8 arrays \(5 n, 32, 32, 3\)"):
        stream(root, corruptions=["fog"])
    fog.write_bytes(b"<html>Google Drive - Virus scan warning</html>")
    with pytest.raises(ValueError, match=r"cannot read .*fog\.npy"):
        stream(root, corruptions=["fog"])
    np.save(fog, np.zeros((5 * N, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"fog\.npy: .* got float32 of shape \(30, 32, 32, 3\)"):
        stream(root, corruptions=["fog"])
    np.save(fog, np.zeros((5 * N - 1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"fog\.npy has 29 rows: .* a positive multiple of 5 rows"):
        stream(root, corruptions=["fog"])


def test_a_labels_file_of_the_wrong_length_or_kind_is_named(cifar10_c):
    root, labels, _ = cifar10_c
    np.save(root / "labels.npy", np.tile(labels, 5)[:-1])
    with pytest.raises(
        ValueError, match=r"labels\.npy has 29 labels but .*gaussian_noise\.npy has 30 rows .*expected 30"
    ):
        stream(root)
    np.save(root / "labels.npy", np.zeros((5 * N, 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels\.npy: .*1-D integer array, got int64 of shape \(30, 1\)"):
        stream(root)
    (root / "labels.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(ValueError, match=r"cannot read .*labels\.npy"):
        stream(root)


def test_invalid_arguments_name_the_valid_values(cifar10_c):
    root, _, _ = cifar10_c
    with pytest.raises(ValueError, match=r"corruptions must be .* of \['gaussian_noise', .*'jpeg_compression'\]"):
        CIFAR10CDataModule(root, corruptions=["fog", "rain"])
    with pytest.raises(ValueError, match=r"severities must be a non-empty list of integers in 1\.\.5"):
        CIFAR10CDataModule(root, severities=[0, 5])
    with pytest.raises(ValueError, match="n_examples must be a positive integer"):
        CIFAR10CDataModule(root, n_examples=0)
    with pytest.raises(ValueError, match=r"fog\.npy: n_examples=7 but the domain has only 6 images"):
        stream(root, corruptions=["fog"], n_examples=7)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        CIFAR10CDataModule(root, batch_size=0)
    with pytest.raises(RuntimeError, match=r"setup\(\) must run before"):
        CIFAR10CDataModule(root).test_dataloader()
