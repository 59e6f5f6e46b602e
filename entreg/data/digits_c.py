"""digits-C: ImageNet-C corruptions of the bundled digits, generated once and cached with a checksum.

The corruptions come from the optional package ``imagecorruptions-imaug`` (``pip install
entreg[corruptions]``), imported only when a set is generated. These are ImageNet-C's constants
applied to 32x32 digits: the set is not comparable with CIFAR-10-C.

Grey images: ``imagecorruptions.corrupt`` turns a grey image into three equal channels and
corrupts those. Eleven of the 15 common corruptions (and gaussian_blur) keep the channels equal;
the per-channel noises (gaussian, shot, impulse, speckle) draw each channel independently; frost,
spatter and saturate tint the image. :func:`corrupt_digits` keeps channel 0 of the noises (one channel keeps
ImageNet-C's per-pixel noise level, the mean of three would divide its std by up to √3) and the
ITU-R BT.601 luminance (PIL's ``convert("L")``) of everything else, which is exact for equal channels.

Seeding: image ``i`` is corrupted after ``np.random.seed(seed + i)``, and impulse_noise (scikit-image's
generator) and glass_blur (numba's generator) also get ``seed=seed + i``. With the same package
versions the corruptions then give identical bytes in separate processes (checked: all 19 on 20
digits at severity 5; the 15 common ones on the 597-image test split at severities 3 and 5; without
the seed= arguments impulse_noise and glass_blur differ between runs). Other versions of numpy,
scikit-image, OpenCV or numba may change the bytes; hence the cache, which records the versions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from entreg.data.cache import ArrayCache, cache_root, sha256_array
from entreg.data.corruptions import CORRUPTION_PACKAGES, corrupt_each, imagecorruptions
from entreg.data.corruptions import INSTALL_HINT as INSTALL_HINT  # re-exported
from entreg.data.corruptions import MIN_SIZE as MIN_SIZE  # re-exported
from entreg.data.corruptions import check_corruption as _check
from entreg.data.torch_shifts import SHIFTS, apply_shift

__all__ = ["BACKENDS", "DigitsCCache", "corrupt_digits", "corruption_names", "default_cache_dir"]

_PER_CHANNEL_NOISE = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"})
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def _imagecorruptions() -> Any:
    return imagecorruptions("digits-C")


def _grey(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, H, W) numpy array of (N, H, W) or (N, 1, H, W) images: uint8, or floats in [0, 1]."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    if a.dtype != np.uint8 and not (np.issubdtype(a.dtype, np.floating) and a.min() >= 0 and a.max() <= 1):
        raise ValueError(f"images must be uint8, or floats in [0, 1]; got {a.dtype} in [{a.min()}, {a.max()}]")
    return a


def _as_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    a = _grey(images)
    return a if a.dtype == np.uint8 else np.rint(a * 255).astype(np.uint8)


def _as_unit_float(images: np.ndarray | torch.Tensor) -> np.ndarray:
    a = _grey(images)
    return a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)


def corrupt_digits(images: np.ndarray | torch.Tensor, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` under one of imagecorruptions' 19 corruptions, as uint8 (N, H, W).

    ``images``: (N, H, W) or (N, 1, H, W), uint8 or floats in [0, 1] (rounded to uint8 first), at
    least 32x32. See the module docstring for the grey conversion and the seeding (image ``i`` uses
    ``seed + i``; numpy's global random state is restored afterwards).

    Example:
        >>> x = np.zeros((2, 32, 32), dtype=np.uint8)
        >>> y = corrupt_digits(x, "gaussian_noise", 3, seed=0)  # doctest: +SKIP
        >>> y.shape, y.dtype, bool((y == corrupt_digits(x, "gaussian_noise", 3, seed=0)).all())  # doctest: +SKIP
        ((2, 32, 32), dtype('uint8'), True)
    """
    _check(corruption, severity, corruption_names("imagecorruptions"))
    x = _as_uint8(images)

    def keep(rgb: np.ndarray) -> np.ndarray:
        return rgb[..., 0] if corruption in _PER_CHANNEL_NOISE else np.rint(rgb @ _LUMA)

    return corrupt_each(x, corruption, severity, seed, keep, np.empty_like(x), "digits-C")


def _torch_shift(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """:func:`entreg.data.torch_shifts.apply_shift` with a generator seeded by ``seed``, as float32 (N, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    return apply_shift(torch.from_numpy(images).unsqueeze(1), corruption, severity, generator)[:, 0].numpy()


def _torch_names() -> list[str]:
    return list(SHIFTS)


class _Backend(NamedTuple):
    names: Callable[[], list[str]]
    prepare: Callable[[np.ndarray | torch.Tensor], np.ndarray]  # the input format its corrupt takes
    corrupt: Callable[[np.ndarray, str, int, int], np.ndarray]
    packages: tuple[str, ...]  # whose versions a manifest records


_BACKENDS = {
    "imagecorruptions": _Backend(
        lambda: _imagecorruptions().get_corruption_names("all"),
        _as_uint8,
        corrupt_digits,
        CORRUPTION_PACKAGES,
    ),
    "torch": _Backend(_torch_names, _as_unit_float, _torch_shift, ("torch", "numpy")),
}
BACKENDS = tuple(_BACKENDS)


def _backend(name: str) -> _Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {list(BACKENDS)}")
    return _BACKENDS[name]


def corruption_names(backend: str = "imagecorruptions") -> list[str]:
    """The corruptions of ``backend``: imagecorruptions' 15 common + 4 validation ones, or the 5 torch shifts.

    Example:
        >>> corruption_names("torch")
        ['gaussian_noise', 'impulse_noise', 'contrast', 'brightness', 'gaussian_blur']
    """
    return _backend(backend).names()


def default_cache_dir() -> Path:
    """``$ENTREG_CACHE/digits_c``, or ``~/.cache/entreg/digits_c`` when ``ENTREG_CACHE`` is unset."""
    return cache_root() / "digits_c"


class DigitsCCache:
    """Corrupted image sets, generated on the first request and read back from ``cache_dir`` afterwards.

    One ``.npz`` (the array) and one ``.json`` manifest per (backend, corruption, severity, seed,
    clean images): the file name holds the image size, count and the first hex digits of the clean
    images' sha256, so another split or size never reads a wrong file. The manifest records the
    array's sha256, dtype and shape, the settings, the caller's ``source`` description and the
    package versions. Every load recomputes the sha256 and raises ``RuntimeError`` on a mismatch
    (delete the two files to regenerate): a damaged cache is never used, nor silently replaced by
    a set that other package versions may have made different. Both files are written to a
    temporary name and renamed, the manifest last, so concurrent processes (DDP ranks) never read
    a half-written file.

    Args:
        cache_dir: folder of the files (default :func:`default_cache_dir`).
        backend: ``"imagecorruptions"`` (:func:`corrupt_digits`, uint8 results) or ``"torch"``
            (:func:`~entreg.data.torch_shifts.apply_shift` with a generator seeded by ``seed``, float32 results).

    Attributes:
        generated: how many sets this instance generated rather than read.

    Example:
        >>> import tempfile
        >>> x = np.full((4, 32, 32), 0.5, dtype=np.float32)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     cache = DigitsCCache(folder, backend="torch")
        ...     first = cache.get(x, "gaussian_noise", 3, seed=0)
        ...     again = cache.get(x, "gaussian_noise", 3, seed=0)  # read back, checksum verified
        >>> first.shape, bool((first == again).all()), cache.generated
        ((4, 32, 32), True, 1)
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, backend: str = "imagecorruptions") -> None:
        self.backend = _backend(backend)
        self.backend_name = backend
        self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        self._cache = ArrayCache(self.cache_dir, "npz")

    @property
    def generated(self) -> int:
        return self._cache.generated

    def get(
        self,
        images: np.ndarray | torch.Tensor,
        corruption: str,
        severity: int,
        seed: int = 0,
        source: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """``images`` ((N, H, W) or (N, 1, H, W), uint8 or floats in [0, 1]) under ``corruption``, (N, H, W).

        ``source`` (e.g. the split that gave ``images``) is recorded in a new manifest, for people.
        """
        _check(corruption, severity, self.backend.names())
        x = self.backend.prepare(images)
        settings = {
            "backend": self.backend_name,
            "corruption": corruption,
            "severity": severity,
            "seed": seed,
            "input_shape": list(x.shape),
            "input_sha256": sha256_array(x),
        }
        n, height, width = x.shape
        stem = f"{self.backend_name}-{corruption}-s{severity}-seed{seed}-{height}x{width}-n{n}-"
        stem += settings["input_sha256"][:12]
        generate = lambda: self.backend.corrupt(x, corruption, severity, seed)  # noqa: E731
        return self._cache.get(stem, settings, generate, source, self.backend.packages)
