"""ImageNet-C (Hendrycks & Dietterich, ICLR 2019) from its published folders.

Layout of the release (https://zenodo.org/records/2235448, one tar per corruption family):
``<root>/<corruption>/<severity>/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``, the 50,000 validation images of every
corruption and severity, already resized to 256 and centre-cropped to 224 (so the stream's default transform is
``ToTensor`` only, as RobustBench's and mariodoebler/test-time-adaptation's). Labels are the wnid's index among the
1000 sorted ImageNet wnids (:data:`~entreg.data.imagenet_classes.IMAGENET_WNIDS`), whatever folders are present.

Which images: ``image_ids="robustbench"`` (default), RobustBench's 5,000 ids (``robustbench/helper_files/
imagenet_test_image_ids.txt``, built in: :func:`~entreg.data.imagenet_ids.robustbench_imagenet_c_ids`), the
protocol of the published TTA tables; a path to a file of ``<wnid>/<file>`` lines (the same format, e.g.
mariodoebler's ``imagenet_val_ids_50k.txt``); or ``"all"``, every image found (ImageFolder order).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entreg.data.folder_streams import scan_folder
from entreg.data.imagenet_classes import IMAGENET_WNIDS
from entreg.data.imagenet_ids import robustbench_imagenet_c_ids
from entreg.data.streams import BenchmarkStream, Domain, ImageFiles, check_severities, corruption_list

__all__ = ["ImageNetCDataModule", "read_image_ids"]

_ID = re.compile(r"(n\d{8})/([^/\\]+)")
_WNID_INDEX = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}
DOWNLOAD_HINT = "ImageNet-C's tars are at https://zenodo.org/records/2235448"


def read_image_ids(path: str | Path) -> list[str]:
    """The ``<wnid>/<file>`` lines of an id-list file (RobustBench's format; blank lines and CRLF endings allowed),
    in order; a malformed line, an unknown wnid or a repeated id is an error naming the file and line.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        ...     _ = f.write("n01440764/ILSVRC2012_val_00000293.JPEG\\r\\nn15075141/ILSVRC2012_val_00000001.JPEG")
        >>> read_image_ids(f.name)
        ['n01440764/ILSVRC2012_val_00000293.JPEG', 'n15075141/ILSVRC2012_val_00000001.JPEG']
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image id list not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the image id list {path} ({err})") from None
    return _check_ids([(f"{path}:{number}", line.strip()) for number, line in enumerate(lines, 1) if line.strip()])


def _check_ids(lines: Sequence[tuple[str, str]]) -> list[str]:
    seen: set[str] = set()
    for where, image_id in lines:
        match = _ID.fullmatch(image_id)
        if match is None or match.group(1) not in _WNID_INDEX:
            raise ValueError(f"{where}: {image_id!r} is not '<wnid>/<file>' with one of ImageNet's 1000 wnids")
        if image_id in seen:
            raise ValueError(f"{where}: {image_id!r} is listed twice")
        seen.add(image_id)
    if not lines:
        raise ValueError("the image id list is empty")
    return [image_id for _, image_id in lines]


class ImageNetCDataModule(BenchmarkStream):
    """An ImageNet-C stream: one :class:`~entreg.data.streams.Domain` per corruption and severity (corruptions
    outer; default the 15 common ones in the standard TTA order, severity 5), named ``<corruption>_<severity>``.

    Args:
        root: the ``ImageNet-C`` folder (``<root>/<corruption>/<severity>/<wnid>/<file>``).
        corruptions: which corruption folders (``None``: the 15 common corruptions).
        severities: severities 1..5, in visiting order (default ``[5]``).
        image_ids: ``"robustbench"`` (the 5,000-image subset), ``"all"``, a path to an id-list file, or a list of
            ``<wnid>/<file>`` ids (module docstring). Every listed image must exist in every domain (checked by
            ``setup``; the error names the missing files).
        **kwargs: :class:`~entreg.data.streams.BenchmarkStream` options. ``n_examples`` takes the first k ids of
            the list (RobustBench's rule; its list is in a random order) or, with ``"all"``, a seeded random subset
            when ``shuffle`` is on (the tree is sorted by class).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> root = Path(folder.name)
        >>> for image_id in ("n01440764/a.JPEG", "n15075141/b.JPEG"):
        ...     (root / "fog" / "5" / image_id).parent.mkdir(parents=True, exist_ok=True)
        ...     Image.new("RGB", (224, 224)).save(root / "fog" / "5" / image_id)
        >>> dm = ImageNetCDataModule(root, ["fog"], image_ids=["n15075141/b.JPEG", "n01440764/a.JPEG"], shuffle=False)
        >>> dm.setup()
        >>> dm.domains[0].name, dm.domains[0].dataset.targets
        ('fog_5', [999, 0])
        >>> folder.cleanup()
    """

    num_classes = 1000
    cropped = True

    def __init__(
        self,
        root: str | Path,
        corruptions: Sequence[str] | None = None,
        severities: Sequence[int] | int = (5,),
        image_ids: str | Path | Sequence[str] = "robustbench",
        num_classes: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes != 1000:
            raise ValueError(f"ImageNet-C has 1000 classes, got num_classes={num_classes}")
        self.root = Path(root).expanduser()
        self.corruptions, self.severities = corruption_list(corruptions), check_severities(severities)
        if isinstance(image_ids, str) and image_ids == "robustbench":
            self.image_ids: list[str] | None = robustbench_imagenet_c_ids()
        elif isinstance(image_ids, str) and image_ids == "all":
            self.image_ids = None
            if self.n_examples is not None and not self.shuffle:
                warnings.warn(
                    f"n_examples={self.n_examples} with image_ids='all' and shuffle off takes the first images of a "
                    "tree sorted by class: a few classes only",
                    stacklevel=2,
                )
        elif isinstance(image_ids, (str, Path)):
            self.image_ids = read_image_ids(image_ids)
        else:
            self.image_ids = _check_ids([(f"image_ids[{i}]", str(x).strip()) for i, x in enumerate(image_ids)])
        layout = f"Expected <root>/<corruption>/<severity>/<wnid>/<image> ({DOWNLOAD_HINT})"
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet-C not found: root={str(self.root)!r} is not a directory. {layout}")
        missing = [str(folder) for _, _, folder in self._folders() if not folder.is_dir()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(f"ImageNet-C: missing folder {shown}. {layout}")

    def _folders(self) -> list[tuple[str, int, Path]]:
        return [(c, s, self.root / c / str(s)) for c in self.corruptions for s in self.severities]

    def _listed(self, folder: Path) -> tuple[list[Path], list[int]]:
        """The listed images of ``folder`` in stream order (only those the stream takes must exist)."""
        assert self.image_ids is not None
        ids = [self.image_ids[i] for i in self._order(len(self.image_ids), str(folder))]
        paths = [folder / image_id for image_id in ids]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(paths)} listed images are missing in {folder}: {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}"
            )
        return paths, [_WNID_INDEX[image_id.split("/")[0]] for image_id in ids]

    def _build_domains(self) -> list[Domain]:
        domains = []
        for corruption, severity, folder in self._folders():
            if self.image_ids is None:
                paths, targets = scan_folder(folder, IMAGENET_WNIDS)
                order = self._order(len(paths), str(folder), subset="shuffled")
                paths, targets = [paths[i] for i in order], [targets[i] for i in order]
            else:
                paths, targets = self._listed(folder)
            domains.append(
                Domain(f"{corruption}_{severity}", ImageFiles(paths, targets, self.transform), corruption, severity)
            )
        return domains
