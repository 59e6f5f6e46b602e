"""Corruptions generated from an ImageFolder tree: ImageNet-C's resize and crop, per-image seeding, the checksummed
cache (generated once, shared by stream seeds, damaged files refused), parallel generation, and the real
imagecorruptions sets when imagecorruptions-imaug is installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from entreg.data import ImageFolderCDataModule, corrupt_images, folder_c
from entreg.data.corruptions import COMMON_CORRUPTIONS
from tests.stream_fixtures import write_image_folder


@pytest.fixture
def tree(tmp_path):
    paths = write_image_folder(tmp_path / "val", ["tench", "goldfish"], per_class=3, size=40)
    return tmp_path / "val", paths


@pytest.fixture
def generations(monkeypatch) -> list[tuple[str, int, int]]:
    """Every set generated (corruption, severity, images), not every read."""
    calls: list[tuple[str, int, int]] = []
    corrupt = folder_c.corrupt_with

    def counted(backend, images, corruption, severity, seed):
        calls.append((corruption, severity, len(images)))
        return corrupt(backend, images, corruption, severity, seed)

    monkeypatch.setattr(folder_c, "corrupt_with", counted)
    return calls


def module(root, cache, **kwargs) -> ImageFolderCDataModule:
    options = {"image_size": 32, "backend": "torch", "cache_dir": cache, "num_workers": 0, "shuffle": False}
    return ImageFolderCDataModule(root, **{**options, **kwargs})


def crops(paths, resize: int, size: int) -> np.ndarray:
    prepare = T.Compose([T.Resize(resize), T.CenterCrop(size)])
    return np.stack([np.asarray(prepare(Image.open(p).convert("RGB"))) for p in paths])


def test_sets_are_the_seeded_corruptions_of_imagenet_c_crops(tree, tmp_path, generations):
    root, paths = tree
    dm = module(root, tmp_path / "cache", corruptions=["gaussian_noise", "contrast"], severities=[2, 5])
    dm.prepare_data()
    dm.setup()
    assert generations == [("gaussian_noise", 2, 6), ("gaussian_noise", 5, 6), ("contrast", 2, 6), ("contrast", 5, 6)]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4 and len(list((tmp_path / "cache").glob("*.json"))) == 4
    clean = crops(paths, resize=32 * 256 // 224, size=32)  # Resize(36), CenterCrop(32): ImageNet-C's ratio
    assert [d.name for d in dm.domains] == ["gaussian_noise_2", "gaussian_noise_5", "contrast_2", "contrast_5"]
    for domain in dm.domains:
        expected = folder_c._torch_corrupt(clean, domain.corruption, domain.severity, seed=0)
        assert domain.dataset.targets == [0, 0, 0, 1, 1, 1]  # goldfish < tench
        for i in range(6):
            image, _ = domain.dataset[i]
            np.testing.assert_array_equal(np.rint(image.numpy().transpose(1, 2, 0) * 255), expected[i])
        assert np.abs(expected.astype(int) - clean).mean() > 1  # corrupted
    assert dm.cropped and dm.num_classes == 2


def test_a_second_module_and_other_stream_seeds_read_the_sets(tree, tmp_path, generations):
    root, _ = tree
    first = module(root, tmp_path / "cache", corruptions=["brightness"], shuffle=True, seed=1)
    first.setup()  # generates without prepare_data too
    again = module(root, tmp_path / "cache", corruptions=["brightness"], shuffle=True, seed=2)
    again.prepare_data()
    again.setup()
    assert len(generations) == 1
    a, b = first.domains[0].dataset, again.domains[0].dataset
    assert a.path == b.path and sorted(a.rows) == sorted(b.rows) == list(range(6)) and a.rows != b.rows
    assert [a.targets[a.rows.index(r)] for r in range(6)] == [b.targets[b.rows.index(r)] for r in range(6)]
    # a subset is drawn with corruption_seed: other stream seeds share its sets
    for seed in (1, 2):
        module(root, tmp_path / "cache", corruptions=["brightness"], n_examples=4, shuffle=True, seed=seed).setup()
    assert [n for _, _, n in generations] == [6, 4]
    module(root, tmp_path / "cache", corruptions=["brightness"], image_size=24).setup()  # another crop: a new set
    assert len(generations) == 3


def test_a_damaged_set_is_refused_with_its_name(tree, tmp_path):
    root, _ = tree
    module(root, tmp_path / "cache", corruptions=["contrast"]).setup()
    (npy,) = (tmp_path / "cache").glob("*.npy")
    array = np.load(npy)
    array[0, 0, 0, 0] ^= 1
    np.save(npy, array)
    with pytest.raises(RuntimeError, match=rf"{npy.name} does not match its manifest"):
        module(root, tmp_path / "cache", corruptions=["contrast"]).setup()
    npy.write_bytes(npy.read_bytes()[:200])
    with pytest.raises(RuntimeError, match=rf"cannot read .*{npy.name}"):
        module(root, tmp_path / "cache", corruptions=["contrast"]).setup()


def test_changed_clean_files_make_new_sets(tree, tmp_path, generations):
    root, paths = tree
    module(root, tmp_path / "cache", corruptions=["contrast"]).setup()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(paths[0], "JPEG")
    module(root, tmp_path / "cache", corruptions=["contrast"]).setup()
    assert len(generations) == 2 and len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_parallel_generation_gives_the_same_bytes(tree, tmp_path):
    root, _ = tree
    serial = module(root, tmp_path / "serial", corruptions=["gaussian_noise"])
    serial.setup()
    parallel = module(root, tmp_path / "parallel", corruptions=["gaussian_noise"], generate_workers=2)
    parallel.setup()  # 2 spawned processes, chunks seeded with corruption_seed + their first image
    np.testing.assert_array_equal(np.load(serial.domains[0].dataset.path), np.load(parallel.domains[0].dataset.path))


def test_invalid_arguments_name_the_valid_values(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ValueError, match=r"unknown backend 'cv2'; valid: \['imagecorruptions', 'torch'\]"):
        module(root, tmp_path, backend="cv2")
    with pytest.raises(ValueError, match=r"corruptions must be .* of \['gaussian_noise', 'impulse_noise', 'contrast'"):
        module(root, tmp_path, corruptions=["fog"])  # not a torch shift
    with pytest.raises(ValueError, match=r"image_size must be an integer >= 32 for backend='imagecorruptions'"):
        module(root, tmp_path, backend="imagecorruptions", image_size=16)
    with pytest.raises(ValueError, match="resize_size=20 is smaller than image_size=32"):
        module(root, tmp_path, resize_size=20)
    with pytest.raises(FileNotFoundError, match=r"root='.*absent' is not a directory"):
        module(tmp_path / "absent", tmp_path)
    default = module(root, tmp_path, backend="imagecorruptions")  # constructing needs no optional package
    assert default.corruptions == list(COMMON_CORRUPTIONS)


def test_missing_package_names_the_extra_when_a_set_is_generated(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # makes the import fail
    dm = module(root, tmp_path / "cache", backend="imagecorruptions", corruptions=["fog"])
    with pytest.raises(ImportError, match=r"pip install entreg\[corruptions\]"):
        dm.prepare_data()


# everything below needs imagecorruptions-imaug


def test_imagecorruptions_sets_are_seeded_per_image_rgb(tree, tmp_path):
    imagecorruptions = pytest.importorskip("imagecorruptions")
    root, paths = tree
    clean = crops(paths, 36, 32)
    for corruption in ("gaussian_noise", "impulse_noise", "fog"):
        out = corrupt_images(clean, corruption, 5, seed=3)
        assert out.shape == clean.shape and out.dtype == np.uint8 and np.abs(out.astype(int) - clean).mean() > 5
        assert np.array_equal(corrupt_images(clean[1:], corruption, 5, seed=4), out[1:])  # image i uses seed + i
        assert not np.array_equal(corrupt_images(clean, corruption, 5, seed=4), out)
    np.random.seed(0)
    expected = imagecorruptions.corrupt(clean[0], severity=2, corruption_name="contrast")
    np.testing.assert_array_equal(corrupt_images(clean[:1], "contrast", 2, seed=0)[0], expected)
    dm = module(root, tmp_path / "cache", backend="imagecorruptions", corruptions=["impulse_noise"], severities=[3])
    dm.prepare_data()
    dm.setup()
    stored = np.load(dm.domains[0].dataset.path)
    np.testing.assert_array_equal(stored, corrupt_images(clean, "impulse_noise", 3, seed=0))
