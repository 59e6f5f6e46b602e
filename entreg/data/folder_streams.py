"""Streams of image folders: any ImageFolder tree (ImageNet-Sketch, a user's own shift) and the 200-class
ImageNet-R and ImageNet-A.

Labels: with ``classes="imagenet"`` the class folders are ImageNet wnids and a label is the class's ImageNet index
(:data:`~entreg.data.imagenet_classes.IMAGENET_WNIDS` order), or, with a ``class_subset`` of ImageNet indices, its
position in the subset: ImageNet-R/A's labels 0..199, for a model whose logits are cut to ``logits[:, class_subset]``.
The label comes from the folder's name, not from its rank among the folders present, so a partial tree (a few
classes) keeps the labels of the full one. Image order: torchvision's ImageFolder (classes sorted, files sorted).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entreg.data.imagenet_classes import IMAGENET_A_CLASSES, IMAGENET_R_CLASSES, IMAGENET_WNIDS
from entreg.data.streams import BenchmarkStream, Domain, ImageFiles

__all__ = ["ImageFolderStream", "ImageNetADataModule", "ImageNetRDataModule", "class_names", "scan_folder"]


def class_names(classes: Sequence[str] | str | None, class_subset: Sequence[int] | None) -> list[str] | None:
    """The label order: ``"imagenet"``: the 1000 wnids, or those of ``class_subset``; a list: itself; ``None``:
    ``None`` (the sorted folders found).

    Example:
        >>> class_names("imagenet", [1, 0])
        ['n01443537', 'n01440764']
    """
    if isinstance(classes, str):
        if classes != "imagenet":
            raise ValueError(f"classes must be a list of folder names, 'imagenet' or None, got {classes!r}")
        if class_subset is None:
            return list(IMAGENET_WNIDS)
        bad = [i for i in class_subset if isinstance(i, bool) or not isinstance(i, int) or i not in range(1000)]
        if bad:
            raise ValueError(f"class_subset must hold ImageNet indices in 0..999, got {bad[:5]}")
        return [IMAGENET_WNIDS[i] for i in class_subset]
    if classes is None:
        return None
    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"classes must be a non-empty list without repeats, got {names[:10]}")
    return names


def _check_subset(class_subset: Sequence[int] | None, num_classes: int) -> list[int] | None:
    if class_subset is None:
        return None
    subset = list(class_subset)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in subset) or len(set(subset)) != len(subset):
        raise ValueError(f"class_subset must hold distinct indices >= 0, got {subset[:10]}...")
    if len(subset) != num_classes:
        raise ValueError(f"class_subset has {len(subset)} indices but there are {num_classes} classes")
    return subset


def scan_folder(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """The images of ``<folder>/<class>/...`` (any depth) and their labels (the class's index in ``classes``), in
    ImageFolder's order; a class folder that is not in ``classes`` is an error naming it. Missing class folders are
    allowed (a partial tree); no image at all is an error."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    index = {name: i for i, name in enumerate(classes)}
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = [name for name in present if name not in index]
    if unknown:
        raise ValueError(
            f"{folder} has class folders that are not among the {len(index)} classes: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''} (classes start {list(index)[:3]})"
        )
    samples = make_dataset(str(folder), {name: index[name] for name in present}, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {folder}")
    return [Path(path) for path, _ in samples], [label for _, label in samples]


class ImageFolderStream(BenchmarkStream):
    """An ImageFolder tree ``<root>/<class>/<image>`` as a one-domain stream, or, with ``domains``, one domain per
    sub-folder ``<root>/<domain>/<class>/<image>`` (e.g. DomainNet's styles, a user's shifts), in the order given.

    Args:
        root: the tree.
        classes: label order (module docstring): ``None`` (the sorted class folders found, ImageFolder's labels),
            ``"imagenet"`` (folders are ImageNet wnids) or a list of folder names.
        class_subset: the model's logit indices that labels ``0..num_classes-1`` stand for (ImageNet indices for
            ``classes="imagenet"``, which then label by position in the subset); ``None``: all logits.
        domains: sub-folders of ``root`` that are one domain each; ``None``: ``root`` is the only domain.
        name: the domain's name when there is one (default: ``root``'s folder name).
        num_classes: the expected number of classes (checked; for configs that interpolate it), or ``None``.
        **kwargs: :class:`~entreg.data.streams.BenchmarkStream` options. ``n_examples`` takes a seeded random
            subset (the first of the shuffled order: the tree is sorted by class) unless ``shuffle`` is off.

    The images keep their size under the default ``ToTensor``: batches of images of several sizes need the model's
    resize and crop (``set_transform``, as ``entreg-adapt`` does).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> root = Path(folder.name)
        >>> for wnid in ("n01443537", "n01484850"):
        ...     (root / wnid).mkdir()
        ...     Image.new("RGB", (40, 30)).save(root / wnid / "a.jpg")
        >>> dm = ImageNetRDataModule(root, shuffle=False, num_workers=0)
        >>> dm.setup()
        >>> dm.num_classes, dm.class_subset[:2], dm.domains[0].dataset.targets
        (200, [1, 2], [0, 1])
        >>> folder.cleanup()
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | str | None = None,
        class_subset: Sequence[int] | None = None,
        domains: Sequence[str] | None = None,
        name: str | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: root={str(self.root)!r} is not a directory")
        if isinstance(domains, str):
            domains = [domains]
        self.domain_names = list(domains) if domains is not None else None
        folders = [self.root / d for d in self.domain_names] if self.domain_names is not None else [self.root]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing or (self.domain_names is not None and not self.domain_names):
            raise FileNotFoundError(f"domain folders missing under {self.root}: {missing or 'none given'}")
        self.folders = folders
        self.classes = class_names(classes, class_subset)
        if self.classes is None:
            found = sorted({p.name for f in folders for p in f.iterdir() if p.is_dir()})
            if not found:
                raise FileNotFoundError(f"no class folders in {', '.join(map(str, folders))}")
            self.classes = found
        if num_classes is not None and num_classes != len(self.classes):
            raise ValueError(
                f"num_classes={num_classes} but there are {len(self.classes)} classes: {self.classes[:5]}..."
            )
        self.num_classes = len(self.classes)
        self.class_subset = _check_subset(class_subset, self.num_classes)
        self.name = name or self.root.name

    def _build_domains(self) -> list[Domain]:
        domains = []
        names = self.domain_names if self.domain_names is not None else [self.name]
        for name, folder in zip(names, self.folders, strict=True):
            paths, targets = scan_folder(folder, self.classes)
            order = self._order(len(paths), str(folder), subset="shuffled")
            dataset = ImageFiles([paths[i] for i in order], [targets[i] for i in order], self.transform)
            domains.append(Domain(name, dataset, None, None))
        return domains


class ImageNetRDataModule(ImageFolderStream):
    """ImageNet-R (Hendrycks et al., ICCV 2021; https://github.com/hendrycks/imagenet-r, ``imagenet-r.tar``): 200
    wnid folders, labels 0..199 in sorted-wnid order, ``class_subset`` = :data:`IMAGENET_R_CLASSES`."""

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        kwargs = {"classes": "imagenet", "class_subset": list(IMAGENET_R_CLASSES), "name": "imagenet_r", **kwargs}
        super().__init__(root, **kwargs)


class ImageNetADataModule(ImageFolderStream):
    """ImageNet-A (Hendrycks et al., CVPR 2021; https://github.com/hendrycks/natural-adv-examples,
    ``imagenet-a.tar``): 200 wnid folders, labels 0..199 in sorted-wnid order, ``class_subset`` =
    :data:`IMAGENET_A_CLASSES`."""

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        kwargs = {"classes": "imagenet", "class_subset": list(IMAGENET_A_CLASSES), "name": "imagenet_a", **kwargs}
        super().__init__(root, **kwargs)
