"""Writers of small benchmark files in exactly the published on-disk formats, for the stream tests.

- CIFAR-10-C/-100-C: ``<root>/<corruption>.npy`` uint8 ``(5 n, 32, 32, 3)`` (severities 1..5 stacked in blocks of
  ``n``) and ``<root>/labels.npy`` (the ``n`` labels repeated per block: ``5 n`` entries), as ``np.save`` writes them.
  Every image carries where it comes from: pixel ``[0, 0]`` is ``(corruption index, severity, row % 256)`` and
  pixel ``[0, 1]`` is ``(row // 256, 0, 0)``, so a test can read back which row of which file a stream item is.
- ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` (224 x 224 JPEGs).
- Id lists: RobustBench's ``imagenet_test_image_ids.txt`` format (``<wnid>/<file>`` lines, no trailing newline;
  mariodoebler's copy has CRLF endings).
- ImageFolder trees (ImageNet-R/A: ``<root>/<wnid>/<image>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar_c(
    root: Path, corruptions: Sequence[str], n: int, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """CIFAR-C files with ``n`` images per severity; returns the ``n`` labels and each corruption's array."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    np.save(root / "labels.npy", np.tile(labels, 5).astype(np.uint8))  # the release stores 5 n uint8 labels
    arrays = {}
    for k, corruption in enumerate(corruptions):
        images = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        for row in range(5 * n):
            images[row, 0, 0] = (k, row // n + 1, row % 256)
            images[row, 0, 1] = (row // 256, 0, 0)
        np.save(root / f"{corruption}.npy", images)
        arrays[corruption] = images
    return labels, arrays


def cifar_source(image: np.ndarray | object) -> tuple[int, int, int]:
    """``(corruption index, severity, row)`` of a fixture image (uint8 HWC array, or a CHW float tensor in [0, 1])."""
    a = np.asarray(image)
    if a.dtype != np.uint8:  # a ToTensor output
        a = np.rint(a.transpose(1, 2, 0) * 255).astype(np.uint8)
    return int(a[0, 0, 0]), int(a[0, 0, 1]), int(a[0, 0, 2]) + 256 * int(a[0, 1, 0])


def save_jpeg(path: Path, size: int = 224, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(path, "JPEG", quality=90)


def write_imagenet_c(
    root: Path, corruptions: Sequence[str], severities: Sequence[int], ids: Sequence[str], size: int = 224
) -> None:
    """An ImageNet-C tree holding the images ``ids`` (``<wnid>/<file>``) in every corruption and severity."""
    for corruption in corruptions:
        for severity in severities:
            for i, image_id in enumerate(ids):
                save_jpeg(root / corruption / str(severity) / image_id, size, value=(40 * severity + i) % 256)


def val_id(wnid: str, number: int) -> str:
    return f"{wnid}/ILSVRC2012_val_{number:08d}.JPEG"


def write_id_list(path: Path, ids: Sequence[str], crlf: bool = False) -> Path:
    """RobustBench's id-list format: one ``<wnid>/<file>`` a line, no trailing newline."""
    path.write_bytes(("\r\n" if crlf else "\n").join(ids).encode())
    return path


def write_image_folder(root: Path, classes: Sequence[str], per_class: int = 2, size: int = 40) -> list[Path]:
    """``<root>/<class>/<i>.jpg`` images, different per class and index; returns the paths in ImageFolder order."""
    paths = []
    for c, name in enumerate(sorted(classes)):
        for i in range(per_class):
            path = root / name / f"img_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size + 8 * i, size), ((60 * c) % 256, (90 * i) % 256, 200)).save(path, "JPEG")
            paths.append(path)
    return paths


def stream_config_overrides(name: str, tmp_path: Path) -> list[str]:
    """Write a small fixture for ``configs/stream/<name>.yaml`` (a benchmark stream) under ``tmp_path`` and return the
    overrides that point the config at it (loading in the main process: ``stream.num_workers=0``)."""
    from entreg.data import COMMON_CORRUPTIONS, IMAGENET_A_CLASSES, IMAGENET_R_CLASSES, IMAGENET_WNIDS
    from entreg.data.imagenet_ids import robustbench_imagenet_c_ids

    root = tmp_path / name
    if name in ("cifar10_c", "cifar100_c"):
        write_cifar_c(root, COMMON_CORRUPTIONS, n=4, num_classes=10 if name == "cifar10_c" else 100)
        extra = []
    elif name == "imagenet_c":  # the first two of RobustBench's ids, in every corruption at severity 5
        write_imagenet_c(root, COMMON_CORRUPTIONS, [5], robustbench_imagenet_c_ids()[:2], size=64)
        extra = ["stream.n_examples=2"]
    elif name in ("imagenet_r", "imagenet_a"):
        subset = IMAGENET_R_CLASSES if name == "imagenet_r" else IMAGENET_A_CLASSES
        write_image_folder(root, [IMAGENET_WNIDS[subset[j]] for j in (0, 100, 199)], per_class=2)
        extra = []
    elif name in ("image_folder", "image_folder_c"):
        write_image_folder(root, ["cat", "dog"], per_class=2)
        extra = []
        if name == "image_folder_c":  # the torch backend needs no optional package
            extra = ["stream.backend=torch", "stream.image_size=32", f"stream.cache_dir={tmp_path / 'cache'}"]
    else:
        raise ValueError(f"no fixture for stream config {name!r}")
    return [f"stream.root={root}", "stream.num_workers=0", *extra]
