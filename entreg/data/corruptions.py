"""ImageNet-C's corruptions through the optional package ``imagecorruptions-imaug`` (``pip install
entreg[corruptions]``, imported only when an image is corrupted), seeded image by image.

Seeding: image ``i`` is corrupted after ``np.random.seed(seed + i)``, and impulse_noise (scikit-image's generator)
and glass_blur (numba's generator) also get ``seed=seed + i``; numpy's global state is restored afterwards. With the
same package versions the bytes are then identical in separate processes, and a set split into chunks (``seed +
start`` for the chunk starting at image ``start``) equals the set made whole. Other versions of numpy,
scikit-image, OpenCV or numba may change the bytes: cache the sets (:class:`entreg.data.cache.ArrayCache`) with the
versions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "COMMON_CORRUPTIONS",
    "CORRUPTION_PACKAGES",
    "INSTALL_HINT",
    "MIN_SIZE",
    "check_corruption",
    "corrupt_each",
    "corrupt_images",
]

INSTALL_HINT = "pip install entreg[corruptions]"
MIN_SIZE = 32  # imagecorruptions' smallest image side
# the 15 corruptions of CIFAR-10-C/ImageNet-C in the order of the TTA literature (Tent, CoTTA, EATA, SAR,
# mariodoebler/test-time-adaptation's CORRUPTION.TYPE): the continual protocol visits them in this order.
# RobustBench's own CORRUPTIONS tuple lists them in another order; it is not used here.
COMMON_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# whose versions a cache manifest of imagecorruptions sets records
CORRUPTION_PACKAGES = ("imagecorruptions-imaug", "numpy", "scikit-image", "scipy", "opencv-python", "numba", "pillow")
_SEED_ARGUMENT = frozenset({"impulse_noise", "glass_blur"})  # their own generators take seed=


def imagecorruptions(what: str = "this") -> Any:
    """The ``imagecorruptions`` module, or an ``ImportError`` saying that ``what`` needs the optional extra."""
    try:
        import imagecorruptions
    except ImportError as err:
        raise ImportError(f"{what} needs the optional package imagecorruptions-imaug: {INSTALL_HINT}") from err
    return imagecorruptions


def check_corruption(corruption: str, severity: int, valid: list[str]) -> None:
    """A ``ValueError`` naming the valid values unless ``corruption`` is in ``valid`` and ``severity`` in 1..5."""
    if corruption not in valid:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {valid}")
    if not isinstance(severity, int) or isinstance(severity, bool) or severity not in range(1, 6):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def corrupt_each(
    images: np.ndarray,
    corruption: str,
    severity: int,
    seed: int,
    keep: Callable[[np.ndarray], np.ndarray],
    out: np.ndarray,
    what: str = "this",
) -> np.ndarray:
    """``out[i] = keep(corrupt(images[i]))`` for uint8 ``images`` (N, H, W[, 3]) of at least 32x32, image ``i``
    seeded with ``seed + i`` (module docstring). Returns ``out``."""
    check_corruption(corruption, severity, imagecorruptions(what).get_corruption_names("all"))
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if min(images.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"imagecorruptions needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {images.shape[1:3]}")
    if not isinstance(seed, int) or seed < 0 or seed + len(images) > 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32 - N] (numpy seeds image i with seed + i), got {seed!r}")
    corrupt = imagecorruptions(what).corrupt
    state = np.random.get_state()
    try:
        for i, image in enumerate(images):
            np.random.seed(seed + i)
            kwargs = {"seed": seed + i} if corruption in _SEED_ARGUMENT else {}
            out[i] = keep(corrupt(image, severity=severity, corruption_name=corruption, **kwargs))
    finally:
        np.random.set_state(state)
    return out


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """RGB ``images`` (uint8, (N, H, W, 3), at least 32x32) under one of imagecorruptions' 19 corruptions, uint8
    (N, H, W, 3); image ``i`` seeded with ``seed + i``.

    Example:
        >>> x = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
        >>> y = corrupt_images(x, "gaussian_noise", 3, seed=0)  # doctest: +SKIP
        >>> y.shape, y.dtype, bool((y == corrupt_images(x, "gaussian_noise", 3, seed=0)).all())  # doctest: +SKIP
        ((2, 32, 32, 3), dtype('uint8'), True)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    return corrupt_each(images, corruption, severity, seed, _as_rgb_uint8, np.empty_like(images))


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """imagecorruptions returns uint8 (H, W, 3) (grey inputs come back as three channels); clip to be sure."""
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else np.clip(np.rint(image), 0, 255).astype(np.uint8)
