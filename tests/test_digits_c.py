"""digits-C: the cache (round trip, checksum, atomic writes) through the torch backend, which needs no optional
package, and the real imagecorruptions sets on 10-20 images when imagecorruptions-imaug is installed."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from entreg.data import DigitsDataModule, ShiftedDigitsDataModule, digits_c
from entreg.data.digits import load_digits_tensors
from entreg.data.digits_c import BACKENDS, DigitsCCache, corrupt_digits, corruption_names
from entreg.data.shifts import SHIFTS, apply_shift

SMALL_SPLIT = (1000, 787, 10)  # a 10-image test split keeps imagecorruptions fast


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """20 clean digits, (20, 32, 32) in [0, 1]."""
    return load_digits_tensors(32)[0][:20, 0]


@pytest.fixture
def counted_torch_backend(monkeypatch) -> list[str]:
    """The torch backend, recording every generation (not every read) in the returned list."""
    backend = digits_c._BACKENDS["torch"]
    calls: list[str] = []

    def corrupt(images, corruption, severity, seed):
        calls.append(corruption)
        return backend.corrupt(images, corruption, severity, seed)

    monkeypatch.setitem(digits_c._BACKENDS, "torch", backend._replace(corrupt=corrupt))
    return calls


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_second_get_reads_the_file_without_generating(tmp_path, digits, counted_torch_backend):
    first = DigitsCCache(tmp_path, "torch").get(digits, "gaussian_noise", 3, seed=0)
    assert [Path(name).suffix for name in files(tmp_path)] == [".json", ".npz"]
    mtimes = [p.stat().st_mtime_ns for p in tmp_path.iterdir()]
    cache = DigitsCCache(tmp_path, "torch")
    again = cache.get(digits, "gaussian_noise", 3, seed=0)
    assert counted_torch_backend == ["gaussian_noise"] and cache.generated == 0
    assert [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == mtimes
    np.testing.assert_array_equal(again, first)
    assert again.shape == (20, 32, 32) and again.dtype == np.float32


def test_each_setting_and_input_gets_its_own_file(tmp_path, digits, counted_torch_backend):
    cache = DigitsCCache(tmp_path, "torch")
    requests = [(digits[:10], 3, 0), (digits[10:], 3, 0), (digits[:10], 4, 0), (digits[:10], 3, 1)]
    sets = [cache.get(x, "gaussian_noise", severity, seed) for x, severity, seed in requests]
    assert len(counted_torch_backend) == 4 and len(files(tmp_path)) == 8
    for i in range(1, 4):  # another split, severity or seed never reads the first file
        assert not np.array_equal(sets[0], sets[i])


def test_torch_backend_equals_apply_shift_with_a_generator_seeded_by_seed(tmp_path, digits):
    # ShiftedDigitsDataModule(backend="torch") draws all its shifts from one generator, so only its
    # first stream starts from the same state; the cache seeds a fresh generator for every set
    cache = DigitsCCache(tmp_path, "torch")
    for shift in SHIFTS:
        expected = apply_shift(digits[:, None], shift, 4, torch.Generator().manual_seed(7))[:, 0]
        np.testing.assert_array_equal(cache.get(digits, shift, 4, seed=7), expected.numpy())


def test_a_tampered_file_is_never_used(tmp_path, digits):
    cache = DigitsCCache(tmp_path, "torch")
    clean = cache.get(digits, "contrast", 2, seed=0)
    (npz,) = tmp_path.glob("*.npz")
    tampered = clean.copy()
    tampered[0, 0, 0] += 0.5
    np.savez_compressed(npz, images=tampered)
    with pytest.raises(RuntimeError, match="does not match its manifest"):
        cache.get(digits, "contrast", 2, seed=0)
    npz.write_bytes(npz.read_bytes()[:100])  # truncated
    with pytest.raises(RuntimeError, match="cannot read"):
        cache.get(digits, "contrast", 2, seed=0)


def test_a_failed_write_leaves_no_files(tmp_path, digits, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", fail)
    with pytest.raises(OSError, match="disk full"):
        DigitsCCache(tmp_path, "torch").get(digits, "brightness", 1)
    assert files(tmp_path) == []


def test_concurrent_writers_leave_one_valid_pair_of_files(tmp_path, digits):
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(DigitsCCache(tmp_path, "torch").get(digits, "impulse_noise", 5)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(np.array_equal(r, results[0]) for r in results)
    assert len(files(tmp_path)) == 2  # no temporary files left
    np.testing.assert_array_equal(DigitsCCache(tmp_path, "torch").get(digits, "impulse_noise", 5), results[0])


def test_invalid_arguments_name_the_valid_values(tmp_path, digits):
    cache = DigitsCCache(tmp_path, "torch")
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'; valid: \['gaussian_noise'.*'gaussian_blur'\]"):
        cache.get(digits, "fog", 3)
    for severity in (0, 6, 2.0):
        with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5"):
            cache.get(digits, "contrast", severity)
    with pytest.raises(ValueError, match=r"unknown backend 'cv2'; valid: \['imagecorruptions', 'torch'\]"):
        DigitsCCache(tmp_path, "cv2")
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        cache.get(digits * 2, "contrast", 3)
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, 1, H, W\)"):
        cache.get(digits[0], "contrast", 3)
    assert files(tmp_path) == []
    assert BACKENDS == ("imagecorruptions", "torch")


def test_missing_package_names_the_extra(monkeypatch, digits):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install entreg\[corruptions\]"):
        corrupt_digits(digits, "gaussian_noise", 3)
    with pytest.raises(ImportError, match=r"pip install entreg\[corruptions\]"):
        ShiftedDigitsDataModule(shifts=["gaussian_noise"], backend="imagecorruptions")


def test_importing_entreg_data_does_not_import_imagecorruptions():
    code = "import sys, entreg, entreg.data; assert 'imagecorruptions' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_config_is_digits_c_with_the_15_common_corruptions():
    from hydra import compose, initialize_config_module

    with initialize_config_module("entreg.configs", version_base="1.3"):
        cfg = compose("adapt", overrides=["stream=digits_c", "ckpt_path=unused"]).stream
    assert cfg.backend == "imagecorruptions" and cfg.cache_dir is None and cfg.severity == 3
    assert (cfg.size, cfg.channels, list(cfg.split), cfg.seed) == (32, 1, [1000, 200, 597], 0)
    common = pytest.importorskip("imagecorruptions").get_corruption_names("common")
    assert list(cfg.shifts) == common


# everything below needs imagecorruptions-imaug; glass_blur is left out (numba's first call costs seconds)


def test_digits_c_sets_are_corrupted_uint8_and_seeded(tmp_path, digits):
    pytest.importorskip("imagecorruptions")
    clean = np.rint(digits.numpy() * 255).astype(np.uint8)
    for corruption in ("gaussian_noise", "impulse_noise", "frost"):
        out = corrupt_digits(digits, corruption, 5, seed=3)
        assert out.shape == (20, 32, 32) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - clean).mean() > 10
        np.testing.assert_array_equal(corrupt_digits(clean, corruption, 5, seed=3), out)
        assert not np.array_equal(corrupt_digits(clean, corruption, 5, seed=4), out)
        assert np.array_equal(corrupt_digits(clean[1:], corruption, 5, seed=4), out[1:])  # image i uses seed + i
    state = np.random.get_state()[1].copy()
    corrupt_digits(clean[:2], "gaussian_noise", 1)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global generator is left alone


def test_noise_keeps_one_channel_and_equal_channels_are_kept_exactly(digits):
    corrupt = pytest.importorskip("imagecorruptions").corrupt
    grey = np.full((10, 32, 32), 128, dtype=np.uint8)
    noise = corrupt_digits(grey, "gaussian_noise", 1).astype(float) - 128
    assert noise.std() == pytest.approx(0.08 * 255, rel=0.05)  # ImageNet-C's sigma, not sigma / sqrt(3)
    clean = np.rint(digits.numpy()[:5] * 255).astype(np.uint8)
    expected = np.stack([corrupt(image, severity=4, corruption_name="contrast")[..., 0] for image in clean])
    np.testing.assert_array_equal(corrupt_digits(clean, "contrast", 4), expected)


def test_digits_c_validates_names_sizes_and_seeds(digits):
    imagecorruptions = pytest.importorskip("imagecorruptions")
    assert corruption_names() == imagecorruptions.get_corruption_names("all")
    with pytest.raises(ValueError, match=r"unknown corruption 'blur'; valid: \['gaussian_noise'.*'saturate'\]"):
        corrupt_digits(digits, "blur", 3)
    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5, got 7"):
        corrupt_digits(digits, "fog", 7)
    with pytest.raises(ValueError, match="at least 32x32"):
        corrupt_digits(digits[:, :16, :16], "fog", 3)
    with pytest.raises(ValueError, match="seed must be"):
        corrupt_digits(digits, "fog", 3, seed=-1)
    with pytest.raises(ValueError, match="needs size >= 32"):
        ShiftedDigitsDataModule(shifts=["fog"], backend="imagecorruptions", size=8)
    with pytest.raises(ValueError, match=r"shifts must be a non-empty list of \['gaussian_noise'"):
        ShiftedDigitsDataModule(shifts=["fog", "rain"], backend="imagecorruptions")


def test_shifted_digits_module_reads_digits_c_standardised_like_the_clean_data(tmp_path):
    pytest.importorskip("imagecorruptions")
    shifts = ["shot_noise", "pixelate"]
    kwargs = {"split": SMALL_SPLIT, "backend": "imagecorruptions", "cache_dir": str(tmp_path), "severity": 3}
    dm = ShiftedDigitsDataModule(shifts=shifts, channels=3, class_sorted=True, **kwargs)
    dm.prepare_data()
    dm.setup("test")
    clean = DigitsDataModule(split=SMALL_SPLIT, channels=3)
    clean.setup("test")
    assert dm.normalization == clean.normalization
    assert len(files(tmp_path)) == 4  # one npz and one json per corruption
    mean, std = dm.normalization
    x_clean, y_clean = clean.test_set.tensors
    order = torch.argsort(y_clean, stable=True)
    for shift, loader in zip(shifts, dm.test_dataloader(), strict=True):
        x, y = loader.dataset.tensors
        assert x.shape == (10, 3, 32, 32) and torch.equal(y, y_clean[order])
        pixels = x * std + mean
        assert torch.allclose(pixels, (pixels * 255).round() / 255, atol=1e-5)  # the cached uint8 / 255
        assert (x - x_clean[order]).abs().mean() > 0.1
        cached = DigitsCCache(tmp_path).get((x_clean[:, 0] * std + mean).clamp(0, 1), shift, 3, seed=0)
        np.testing.assert_allclose(pixels[:, 0].numpy(), cached[order.numpy()] / 255, atol=1e-5)

    mixed = ShiftedDigitsDataModule(shifts=shifts, mixed=True, **kwargs)
    mixed.setup("test")
    (loader,) = mixed.test_dataloader()
    assert len(loader.dataset) == 20 and len(files(tmp_path)) == 4  # read from the cache
