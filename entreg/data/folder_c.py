"""ImageNet-C-style corruptions generated from any ImageFolder tree, cached with a checksum.

Each clean image is resized (shorter side ``resize_size``) and centre-cropped to ``image_size`` (ImageNet-C's
``Resize(256), CenterCrop(224)`` by default), then corrupted: with ``backend="imagecorruptions"`` by
``imagecorruptions-imaug`` (``pip install entreg[corruptions]``; :func:`~entreg.data.corruptions.corrupt_images`,
image ``i`` of a set seeded with ``corruption_seed + i``), with ``backend="torch"`` by the torch stand-ins of
:mod:`entreg.data.torch_shifts` (no extra package; image ``i`` drawn from a generator seeded with
``corruption_seed + i``). One set per (corruption, severity) is generated once, by ``prepare_data`` (or the first
``setup``), optionally in ``generate_workers`` processes (the same bytes: images are seeded one by one), and kept
in an :class:`~entreg.data.cache.ArrayCache` (``.npy``, read memory-mapped) whose key holds the clean files' bytes
and the preprocessing: another folder, subset or size never reads a wrong set, and a damaged file is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from entreg.data.cache import ArrayCache, cache_root
from entreg.data.corruptions import COMMON_CORRUPTIONS, CORRUPTION_PACKAGES, MIN_SIZE, corrupt_images
from entreg.data.folder_streams import _check_subset, class_names, scan_folder
from entreg.data.streams import ArrayImages, BenchmarkStream, Domain, check_names, check_severities, stream_order
from entreg.data.torch_shifts import SHIFTS, apply_shift

__all__ = ["ALL_CORRUPTIONS", "ImageFolderCDataModule", "corrupt_with", "default_folder_c_cache_dir"]

# imagecorruptions' 19: the 15 common ones and the 4 held-out (validation) ones
ALL_CORRUPTIONS: tuple[str, ...] = (*COMMON_CORRUPTIONS, "speckle_noise", "gaussian_blur", "spatter", "saturate")
_BACKENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {  # valid, default, packages
    "imagecorruptions": (ALL_CORRUPTIONS, COMMON_CORRUPTIONS, CORRUPTION_PACKAGES),
    "torch": (SHIFTS, SHIFTS, ("torch", "numpy", "pillow")),
}


def default_folder_c_cache_dir() -> Path:
    """``$ENTREG_CACHE/image_folder_c``, or ``~/.cache/entreg/image_folder_c`` when ``ENTREG_CACHE`` is unset."""
    return cache_root() / "image_folder_c"


def _torch_corrupt(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    import torch

    out = np.empty_like(images)
    for i, image in enumerate(images):
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        y = apply_shift(x, corruption, severity, torch.Generator().manual_seed(seed + i))
        out[i] = (y[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return out


def corrupt_with(backend: str, images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """uint8 RGB ``images`` (N, H, W, 3) under ``corruption`` with ``backend``, image ``i`` seeded with ``seed + i``.

    Example:
        >>> x = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
        >>> y = corrupt_with("torch", x, "gaussian_noise", 3, seed=0)
        >>> bool((y[1:] == corrupt_with("torch", x[1:], "gaussian_noise", 3, seed=1)).all())  # seeded per image
        True
    """
    if backend == "torch":
        return _torch_corrupt(images, corruption, severity, seed)
    return corrupt_images(images, corruption, severity, seed)


def _corrupt_chunk(args: tuple[str, np.ndarray, str, int, int]) -> np.ndarray:
    """One chunk, in a worker process (one thread, as DataLoader workers)."""
    import torch

    torch.set_num_threads(1)
    return corrupt_with(*args)


class ImageFolderCDataModule(BenchmarkStream):
    """Corruptions of an ImageFolder tree ``<root>/<class>/<image>`` (module docstring): one
    :class:`~entreg.data.streams.Domain` per corruption and severity (corruptions outer), named
    ``<corruption>_<severity>``.

    Args:
        root: the clean tree.
        corruptions: ``None``: the 15 common corruptions in the standard order (``"imagecorruptions"``) or the five
            torch shifts (``"torch"``).
        severities: severities 1..5, in visiting order (default ``[5]``).
        classes, class_subset, num_classes: labels, as :class:`~entreg.data.folder_streams.ImageFolderStream`.
        image_size: side of the centre crop that is corrupted (at least 32 for imagecorruptions).
        resize_size: the shorter side is resized to this before the crop (``None``: ``image_size * 256 / 224``
            rounded down, ImageNet's ratio).
        backend: ``"imagecorruptions"`` or ``"torch"``.
        cache_dir: the cache folder (``None``: :func:`default_folder_c_cache_dir`).
        corruption_seed: the corruptions' seed, and that of the ``n_examples`` subset (the stream's ``seed`` only
            orders the images, so runs with other stream seeds share the sets).
        generate_workers: processes that generate a set (0: this process).
        **kwargs: :class:`~entreg.data.streams.BenchmarkStream` options. ``n_examples`` takes a random subset drawn
            with ``corruption_seed`` (the tree is sorted by class), whose sets are cached for it.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> root = Path(folder.name) / "images"
        >>> for name in ("cat", "dog"):
        ...     (root / name).mkdir(parents=True)
        ...     Image.new("RGB", (48, 40), (100, 120, 140)).save(root / name / "a.png")
        >>> dm = ImageFolderCDataModule(root, ["contrast"], image_size=32, backend="torch",
        ...                             cache_dir=Path(folder.name) / "cache", shuffle=False)
        >>> dm.prepare_data(); dm.setup()
        >>> image, label = dm.domains[0].dataset[1]
        >>> dm.domains[0].name, tuple(image.shape), label
        ('contrast_5', (3, 32, 32), 1)
        >>> folder.cleanup()
    """

    cropped = True

    def __init__(
        self,
        root: str | Path,
        corruptions: Sequence[str] | None = None,
        severities: Sequence[int] | int = (5,),
        classes: Sequence[str] | str | None = None,
        class_subset: Sequence[int] | None = None,
        num_classes: int | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        backend: str = "imagecorruptions",
        cache_dir: str | Path | None = None,
        corruption_seed: int = 0,
        generate_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(_BACKENDS)}")
        valid, default, self._packages = _BACKENDS[backend]
        self.backend = backend
        self.corruptions = list(default) if corruptions is None else check_names(corruptions, valid, "corruptions")
        self.severities = check_severities(severities)
        smallest = MIN_SIZE if backend == "imagecorruptions" else 1
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < smallest:
            raise ValueError(f"image_size must be an integer >= {smallest} for backend={backend!r}, got {image_size!r}")
        self.image_size = image_size
        self.resize_size = resize_size if resize_size is not None else image_size * 256 // 224
        if self.resize_size < image_size:
            raise ValueError(f"resize_size={self.resize_size} is smaller than image_size={image_size}")
        if isinstance(generate_workers, bool) or not isinstance(generate_workers, int) or generate_workers < 0:
            raise ValueError(f"generate_workers must be an integer >= 0, got {generate_workers!r}")
        if not isinstance(corruption_seed, int) or corruption_seed < 0:
            raise ValueError(f"corruption_seed must be an integer >= 0, got {corruption_seed!r}")
        self.corruption_seed, self.generate_workers = corruption_seed, generate_workers
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: root={str(self.root)!r} is not a directory")
        self.classes = class_names(classes, class_subset)
        if self.classes is None:
            self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            if not self.classes:
                raise FileNotFoundError(f"no class folders in {self.root}")
        if num_classes is not None and num_classes != len(self.classes):
            raise ValueError(f"num_classes={num_classes} but there are {len(self.classes)} classes")
        self.num_classes = len(self.classes)
        self.class_subset = _check_subset(class_subset, self.num_classes)
        self.cache = ArrayCache(default_folder_c_cache_dir() if cache_dir is None else cache_dir, "npy")
        self._verified: tuple[dict[tuple[str, int], Path], list[int], list[int]] | None = None

    # ---- the clean set ----------------------------------------------------------------------------------------

    def _selection(self) -> tuple[list[Path], list[int], list[int]]:
        """The clean images of the sets (sorted), their labels, and the stream order as rows of the sets. The subset
        (``n_examples``) is drawn with ``corruption_seed``, so streams with other ``seed`` s share the sets."""
        paths, targets = scan_folder(self.root, self.classes)
        try:
            subset = stream_order(
                len(paths), self.n_examples, self.n_examples is not None, self.corruption_seed, "shuffled"
            )
        except ValueError as err:
            raise ValueError(f"{self.root}: {err}") from None
        chosen = sorted(subset)
        rows = self._order(len(chosen), str(self.root), subset="first")
        return [paths[i] for i in chosen], [targets[i] for i in chosen], rows

    def _clean_key(self, paths: list[Path]) -> dict[str, Any]:
        """What the clean array depends on: every file's path (relative to root) and bytes, and the preprocessing."""
        digest = hashlib.sha256()
        for path in paths:
            digest.update(str(path.relative_to(self.root)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return {
            "files": len(paths),
            "files_sha256": digest.hexdigest(),
            "resize": self.resize_size,
            "crop": self.image_size,
            "interpolation": "bilinear",
        }

    def _clean_images(self, paths: list[Path]) -> np.ndarray:
        from PIL import Image
        from torchvision import transforms as T

        prepare = T.Compose([T.Resize(self.resize_size, T.InterpolationMode.BILINEAR), T.CenterCrop(self.image_size)])
        out = np.empty((len(paths), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, path in enumerate(paths):
            try:
                with Image.open(path) as image:
                    out[i] = np.asarray(prepare(image.convert("RGB")))
            except Exception as err:  # PIL raises several kinds for damaged files
                raise OSError(f"cannot read image {path} ({type(err).__name__}: {err})") from err
        return out

    # ---- generation and reading -------------------------------------------------------------------------------

    def _generate(self, clean: np.ndarray, corruption: str, severity: int) -> np.ndarray:
        seed = self.corruption_seed
        if self.generate_workers <= 1 or len(clean) < 2:
            return corrupt_with(self.backend, clean, corruption, severity, seed)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        size = math.ceil(len(clean) / (4 * self.generate_workers))
        chunks = [
            (self.backend, clean[start : start + size], corruption, severity, seed + start)
            for start in range(0, len(clean), size)
        ]
        # forked where the platform forks (as DataLoader workers are: nothing to re-import), else spawned
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(self.generate_workers, mp_context=context) as pool:
            return np.concatenate(list(pool.map(_corrupt_chunk, chunks)))

    def _sets(self) -> tuple[dict[tuple[str, int], Path], list[int], list[int]]:
        """Every set's file (generated when missing, verified otherwise), the labels of the clean set's rows and the
        stream order as rows; verified once per instance."""
        if self._verified is not None:
            return self._verified
        paths, targets, rows = self._selection()
        key = self._clean_key(paths)
        tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        source = {"root": str(self.root), "classes": len(self.classes)}
        clean: list[np.ndarray] = []  # decoded only when a set must be generated

        def generate(corruption: str, severity: int) -> np.ndarray:
            if not clean:
                clean.append(self._clean_images(paths))
            return self._generate(clean[0], corruption, severity)

        files = {}
        for corruption in self.corruptions:
            for severity in dict.fromkeys(self.severities):
                settings = {"backend": self.backend, "corruption": corruption, "severity": severity}
                settings.update({"seed": self.corruption_seed, "clean": key})
                stem = f"{self.backend}-{corruption}-s{severity}-seed{self.corruption_seed}-"
                stem += f"{self.image_size}px-n{len(paths)}-{tag}"
                self.cache.get(stem, settings, lambda c=corruption, s=severity: generate(c, s), source, self._packages)
                files[corruption, severity] = self.cache.paths(stem)[0]
        self._verified = files, targets, rows
        return self._verified

    def prepare_data(self) -> None:
        """Generate the missing sets (Lightning calls this once per node before every rank's ``setup``)."""
        self._sets()

    def _build_domains(self) -> list[Domain]:
        files, targets, rows = self._sets()
        domains = []
        for corruption in self.corruptions:
            for severity in self.severities:
                dataset = ArrayImages(files[corruption, severity], rows, [targets[r] for r in rows], self.transform)
                domains.append(Domain(f"{corruption}_{severity}", dataset, corruption, severity))
        return domains
