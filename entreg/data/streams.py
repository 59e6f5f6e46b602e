"""Test streams for test-time adaptation: a DataModule whose ``setup`` builds a list of :class:`Domain` (one
dataset per corruption and severity, or one per folder), in the order a protocol visits them.

Every stream item is ``(image, label)``: the image is a PIL RGB image passed through the stream's ``transform``
(default :class:`~torchvision.transforms.ToTensor`: a float CHW tensor in [0, 1], no normalisation, which belongs
to the model), and the label an ``int``. Each domain's dataset also has ``targets`` (its labels in stream order, read
without loading an image) for protocols that reorder by label. ``set_transform`` puts the model's own preprocessing
(resize, crop) in place of ``ToTensor`` before ``setup``.

Order inside a domain (:func:`stream_order`): with ``shuffle``, the base order (file rows, an id list's order,
or ImageFolder's sorted order) permuted by ``random.Random(seed).shuffle``, the permutation of
mariodoebler/test-time-adaptation's ``random.seed(seed); random.shuffle(samples)`` (every domain re-seeded: same
seed, same permutation of equal-length domains), so a stream of all of a domain's images is that repository's order.
``n_examples`` keeps the first k of the base order before shuffling where that order is random (CIFAR-C rows, id
lists: RobustBench's subset), and the first k of the shuffled order for folder trees (sorted by class).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from entreg.data.corruptions import COMMON_CORRUPTIONS

__all__ = ["ArrayImages", "BenchmarkStream", "Domain", "ImageFiles", "StreamDataset", "stream_order"]


class Domain(NamedTuple):
    """One segment of a test stream: a named dataset, with its corruption and severity when it has them."""

    name: str
    dataset: Dataset
    corruption: str | None
    severity: int | None


def stream_order(
    n: int, n_examples: int | None = None, shuffle: bool = False, seed: int = 0, subset: str = "first"
) -> list[int]:
    """Indices ``0..n-1`` in stream order, permuted by ``random.Random(seed).shuffle`` when ``shuffle`` (the order
    ``random.seed(seed); random.shuffle(x)`` gives a list ``x`` of that length), ``n_examples`` of them (all when
    ``None``): with ``subset="first"`` the first ``n_examples`` indices, then shuffled (RobustBench's subset, for
    files in a random order); with ``subset="shuffled"`` the first ``n_examples`` of the shuffled order (a seeded
    random subset, for folder trees sorted by class).

    Example:
        >>> stream_order(5, n_examples=3)
        [0, 1, 2]
        >>> stream_order(5, shuffle=True, seed=1)
        [2, 3, 4, 0, 1]
        >>> stream_order(5, 3, shuffle=True, seed=1), stream_order(5, 3, shuffle=True, seed=1, subset="shuffled")
        ([1, 2, 0], [2, 3, 4])
    """
    if subset not in ("first", "shuffled"):
        raise ValueError(f"subset must be 'first' or 'shuffled', got {subset!r}")
    if n_examples is not None:
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(f"n_examples must be a positive integer or None (all), got {n_examples!r}")
        if n_examples > n:
            raise ValueError(f"n_examples={n_examples} but the domain has only {n} images")
    k = n if n_examples is None else n_examples
    order = list(range(k if subset == "first" else n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order[:k]


class StreamDataset(Dataset):
    """A domain's images in stream order: ``load(i)`` gives the ``i``-th PIL image, ``targets[i]`` its label."""

    def __init__(self, targets: Sequence[int], transform: Callable | None) -> None:
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def load(self, index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


class ArrayImages(StreamDataset):
    """Images that are rows of a uint8 ``(N, H, W, 3)`` ``.npy`` file, read through a memory map that each process
    opens for itself (nothing is copied when the dataset goes to a worker process)."""

    def __init__(self, path: Path, rows: Sequence[int], targets: Sequence[int], transform: Callable | None) -> None:
        super().__init__(targets, transform)
        if len(rows) != len(self.targets):
            raise ValueError(f"{len(rows)} rows but {len(self.targets)} labels")
        self.path, self.rows = Path(path), [int(r) for r in rows]
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def load(self, index: int) -> Any:
        from PIL import Image

        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return Image.fromarray(np.ascontiguousarray(self._array[self.rows[index]]))


class ImageFiles(StreamDataset):
    """Images that are files (JPEG, PNG... anything PIL opens), converted to RGB; a file that cannot be read is an
    error naming it."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], transform: Callable | None) -> None:
        super().__init__(targets, transform)
        if len(paths) != len(self.targets):
            raise ValueError(f"{len(paths)} paths but {len(self.targets)} labels")
        self.paths = [Path(p) for p in paths]

    def load(self, index: int) -> Any:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
            raise OSError(f"cannot read image {path} ({type(err).__name__}: {err})") from err


def _to_tensor() -> Callable:
    from torchvision import transforms as T

    return T.ToTensor()


def check_names(values: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    """``values`` as a list, or a ``ValueError`` naming the valid values (empty lists and repeats refused)."""
    if isinstance(values, str):
        values = [values]
    values = list(values)
    bad = [v for v in values if v not in valid]
    if bad or not values or len(set(values)) != len(values):
        raise ValueError(f"{what} must be a non-empty list without repeats of {list(valid)}, got {values}")
    return values


def check_severities(severities: Sequence[int] | int) -> list[int]:
    """``severities`` as a list of integers in 1..5 (repeats allowed: e.g. the gradual 1..5..1), or a ``ValueError``."""
    if isinstance(severities, int) and not isinstance(severities, bool):
        severities = [severities]
    values = list(severities)
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s not in range(1, 6) for s in values):
        raise ValueError(f"severities must be a non-empty list of integers in 1..5, got {values}")
    return values


class BenchmarkStream(L.LightningDataModule):
    """A test stream: after ``setup``, ``domains`` lists its :class:`Domain` in order.

    ``test_dataloader``/``predict_dataloader`` give one unshuffled loader per domain (the order is the dataset's);
    ``loader_options`` gives the DataLoader settings for code that builds its own loaders (a protocol that mixes
    domains).

    Args:
        batch_size: images per batch.
        num_workers: loader processes (JPEG decoding and resizing run there; 0 loads in the main process).
        pin_memory: page-locked batches for fast copies to a GPU; ``None``: when CUDA is available.
        persistent_workers: keep each loader's processes between passes over it (e.g. the source pass, then the
            adapted one); every domain's loader then holds ``num_workers`` processes. Ignored without workers.
        n_examples: the first ``n_examples`` of each domain (``None``: all).
        shuffle: permute each domain's images with ``seed`` (module docstring).
        seed: the permutation's seed.
        transform: image transform (PIL RGB image to tensor); ``None``: ``ToTensor()``.

    Subclasses set ``num_classes``, ``class_subset`` (the ImageNet indices of the model's logits that the labels
    0..num_classes-1 stand for, or ``None``) and ``cropped`` (``True`` where the images are already resized and
    centre-cropped to the model's input, as ImageNet-C's: the reference pipelines then apply ``ToTensor`` only, and a
    model's transform should skip its resize and crop), and implement ``_build_domains``.
    """

    num_classes: int
    class_subset: list[int] | None = None
    cropped: bool = False  # images already at the model's crop (ImageNet-C): a model transform without resize

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        n_examples: int | None = None,
        shuffle: bool = True,
        seed: int = 1,
        transform: Callable | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        stream_order(n_examples or 1, n_examples)  # validates n_examples
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.n_examples, self.shuffle, self.seed = n_examples, bool(shuffle), int(seed)
        self.transform = transform if transform is not None else _to_tensor()
        self.domains: list[Domain] = []

    # ---- what protocols and the CLI read ----------------------------------------------------------------------

    def set_transform(self, transform: Callable | None) -> None:
        """Use ``transform`` (PIL RGB image to tensor; ``None``: ``ToTensor()``) for every image, e.g. a model's
        resize and crop. Call it before the loaders' worker processes start (they keep the transform they got)."""
        self.transform = transform if transform is not None else _to_tensor()
        for domain in self.domains:
            domain.dataset.transform = self.transform

    def loader_options(self) -> dict[str, Any]:
        """``batch_size``, ``num_workers``, ``pin_memory``, ``persistent_workers``: DataLoader keywords (persistent
        workers only with workers)."""
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    @property
    def shifts(self) -> list[str]:
        """The domains' names (read by ``entreg-adapt`` to name its rows)."""
        return [d.name for d in self.domains]

    # ---- Lightning --------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if not self.domains:
            self.domains = self._build_domains()

    def _build_domains(self) -> list[Domain]:
        raise NotImplementedError

    def _order(self, n: int, where: str, subset: str = "first") -> list[int]:
        """:func:`stream_order` of a domain of ``n`` images, its errors naming ``where``."""
        try:
            return stream_order(n, self.n_examples, self.shuffle, self.seed, subset)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def test_dataloader(self) -> list[DataLoader]:
        if not self.domains:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return [DataLoader(d.dataset, shuffle=False, **self.loader_options()) for d in self.domains]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()


def corruption_list(corruptions: Sequence[str] | None, valid: Sequence[str] = COMMON_CORRUPTIONS) -> list[str]:
    """``corruptions`` checked against ``valid`` (``None``: all of ``valid``, in its order)."""
    return list(valid) if corruptions is None else check_names(corruptions, valid, "corruptions")
