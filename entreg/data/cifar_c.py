"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019) from their published ``.npy`` files.

Layout of the release (``CIFAR-10-C.tar``, https://zenodo.org/records/2535967; ``CIFAR-100-C.tar``,
https://zenodo.org/records/3555552): ``<root>/<corruption>.npy``, uint8 ``(5 n, 32, 32, 3)`` holding severities
1..5 in blocks of ``n = 10,000`` test images (severity ``s`` is rows ``(s-1) n : s n``), and ``<root>/labels.npy``
with the ``5 n`` labels (the test labels repeated per block; ``n`` labels are accepted too). ``n`` is read from the
file length, so smaller files in the same layout work. RobustBench's ``load_corruptions_cifar`` reads the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from entreg.data.streams import ArrayImages, BenchmarkStream, Domain, check_severities, corruption_list

__all__ = ["CIFAR10CDataModule", "CIFAR100CDataModule", "CIFARCDataModule"]

SEVERITIES = 5


def _read_header(path: Path, what: str) -> np.ndarray:
    """``path`` memory-mapped (its shape and dtype checked from the header), or an error naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises ValueError/OSError/EOFError... for truncated or foreign files
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}); {what}") from None


class CIFARCDataModule(BenchmarkStream):
    """A CIFAR-C stream: one :class:`~entreg.data.streams.Domain` per corruption and severity (corruptions outer,
    in the order given; the default is the 15 in the standard TTA order of
    :data:`~entreg.data.corruptions.COMMON_CORRUPTIONS`), named ``<corruption>_<severity>``.

    Args:
        root: the folder of ``<corruption>.npy`` and ``labels.npy``.
        corruptions: which files (``None``: the 15 common corruptions).
        severities: severities 1..5, in visiting order (default ``[5]``).
        num_classes: 10 (CIFAR-10-C) or 100 (CIFAR-100-C); labels outside ``0..num_classes-1`` are an error.
        **kwargs: :class:`~entreg.data.streams.BenchmarkStream` options (``batch_size``, ``num_workers``,
            ``n_examples``: the first k images of each block, ``shuffle``, ``seed``, ``transform``...).

    Missing files are reported at construction; unreadable or inconsistent ones (a cut-short ``.npy``, a labels
    file of another length) by ``setup``, naming the file.

    Example:
        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> root = Path(folder.name)
        >>> np.save(root / "fog.npy", np.zeros((5 * 4, 32, 32, 3), dtype=np.uint8))  # n = 4 images per severity
        >>> np.save(root / "labels.npy", np.arange(5 * 4) % 10)
        >>> dm = CIFAR10CDataModule(root, corruptions=["fog"], severities=[1, 5], shuffle=False, num_workers=0)
        >>> dm.setup()
        >>> [(d.name, len(d.dataset), d.dataset.rows) for d in dm.domains]
        [('fog_1', 4, [0, 1, 2, 3]), ('fog_5', 4, [16, 17, 18, 19])]
        >>> image, label = dm.domains[1].dataset[0]
        >>> tuple(image.shape), label
        ((3, 32, 32), 6)
        >>> folder.cleanup()
    """

    dataset_name = "CIFAR-C"
    download_hint = "see https://zenodo.org/records/2535967 (CIFAR-10-C) or https://zenodo.org/records/3555552"

    def __init__(
        self,
        root: str | Path,
        corruptions: Sequence[str] | None = None,
        severities: Sequence[int] | int = (5,),
        num_classes: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.root = Path(root).expanduser()
        self.corruptions, self.severities = corruption_list(corruptions), check_severities(severities)
        self.num_classes = num_classes
        expected = (
            f"Expected {self.dataset_name}'s files <root>/<corruption>.npy and <root>/labels.npy ({self.download_hint})"
        )
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.dataset_name} not found: root={str(self.root)!r} is not a directory. {expected}"
            )
        missing = [str(p) for p in self._files().values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dataset_name}: missing {', '.join(missing)}. {expected}")

    def _files(self) -> dict[str, Path]:
        return {"labels": self.root / "labels.npy", **{c: self.root / f"{c}.npy" for c in self.corruptions}}

    def _labels(self) -> np.ndarray:
        path = self.root / "labels.npy"
        fmt = f"{self.dataset_name}'s labels.npy is a 1-D integer array"
        labels = _read_header(path, fmt)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: {fmt}, got {labels.dtype} of shape {labels.shape}")
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"{path}: labels must be in 0..{self.num_classes - 1} (num_classes={self.num_classes}), "
                f"got {labels.min()}..{labels.max()}: is root a folder of another data set?"
            )
        return labels

    def _images(self, corruption: str, labels: np.ndarray) -> int:
        """Check ``<corruption>.npy`` against the layout and the labels; return ``n``, the images per severity."""
        path = self.root / f"{corruption}.npy"
        fmt = f"{self.dataset_name}'s <corruption>.npy files are uint8 arrays (5 n, 32, 32, 3), severities 1..5 stacked"
        images = _read_header(path, fmt)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{path}: {fmt}; got {images.dtype} of shape {images.shape}")
        rows = len(images)
        if rows == 0 or rows % SEVERITIES:
            raise ValueError(f"{path} has {rows} rows: {fmt}, so a positive multiple of {SEVERITIES} rows")
        n = rows // SEVERITIES
        if len(labels) not in (rows, n):
            raise ValueError(
                f"{self.root / 'labels.npy'} has {len(labels)} labels but {path} has {rows} rows "
                f"({SEVERITIES} severities of {n}): expected {rows} labels (or {n}, one block)"
            )
        return n

    def _build_domains(self) -> list[Domain]:
        labels = self._labels()
        domains = []
        for corruption in self.corruptions:
            n = self._images(corruption, labels)
            order = self._order(n, str(self.root / f"{corruption}.npy"))
            for severity in self.severities:
                block = (severity - 1) * n
                rows = [block + i for i in order]
                targets = labels[rows] if len(labels) != n else labels[order]
                dataset = ArrayImages(self.root / f"{corruption}.npy", rows, targets, self.transform)
                domains.append(Domain(f"{corruption}_{severity}", dataset, corruption, severity))
        return domains


class CIFAR10CDataModule(CIFARCDataModule):
    """CIFAR-10-C (10 classes): :class:`CIFARCDataModule` with ``num_classes=10``. ``root`` is the extracted
    ``CIFAR-10-C`` folder of https://zenodo.org/records/2535967."""

    dataset_name = "CIFAR-10-C"
    download_hint = "CIFAR-10-C.tar from https://zenodo.org/records/2535967"

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        if kwargs.setdefault("num_classes", 10) != 10:
            raise ValueError(f"CIFAR-10-C has 10 classes, got num_classes={kwargs['num_classes']}")
        super().__init__(root, **kwargs)


class CIFAR100CDataModule(CIFARCDataModule):
    """CIFAR-100-C (100 classes): :class:`CIFARCDataModule` with ``num_classes=100``. ``root`` is the extracted
    ``CIFAR-100-C`` folder of https://zenodo.org/records/3555552."""

    dataset_name = "CIFAR-100-C"
    download_hint = "CIFAR-100-C.tar from https://zenodo.org/records/3555552"

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        if kwargs.setdefault("num_classes", 100) != 100:
            raise ValueError(f"CIFAR-100-C has 100 classes, got num_classes={kwargs['num_classes']}")
        super().__init__(root, **kwargs)
