"""Pretrained classifiers from local weight files: any timm model, torchvision's classification models, and
(in :mod:`entreg.nn.robustbench`) RobustBench's CIFAR corruption models, each with its preprocessing; and local
diffusers pipeline directories (:func:`load_pipeline`).

Every builder returns ``(net, DataConfig)``: the network with the file's weights, in eval mode, and the
preprocessing it was trained with (input size, resize and crop, interpolation, mean and std). Nothing is
downloaded: a missing file, a file that is no checkpoint (e.g. an HTML page saved by a failed download) or
weights that do not fit the architecture raise an error that names the file, the expected format and the
missing/unexpected keys; no layer is ever left silently random.

Example:
    >>> cfg = DataConfig(input_size=(3, 224, 224), resize_size=256, mean=(0.485, 0.456, 0.406),
    ...                  std=(0.229, 0.224, 0.225))
    >>> round(cfg.crop_pct, 3), cfg.image_transform()(torch.zeros(3, 300, 400, dtype=torch.uint8)).shape
    (0.875, torch.Size([3, 224, 224]))
    >>> net = NormalizedClassifier(nn.Flatten(), mean=(0.5,) * 3, std=(0.5,) * 3, class_subset=[2, 0])
    >>> net(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))  # logits 2 and 0 of the normalised image
    tensor([[ 1., -1.]])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "INTERPOLATIONS",
    "TORCH_FORMATS",
    "DataConfig",
    "NormalizedClassifier",
    "WeightsError",
    "check_state_dict",
    "load_pipeline",
    "read_weights_file",
    "timm_model",
    "torchvision_model",
    "unwrap_state_dict",
]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
TORCH_FORMATS = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # torch.save files (zip or legacy pickle)
WEIGHT_SUFFIXES = (".safetensors", *TORCH_FORMATS)
_SHOWN_KEYS = 10  # keys listed per kind of mismatch in an error message


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the architecture (message: file, format, keys)."""


# ---- preprocessing -------------------------------------------------------------------------------------------


def _floats(values: Sequence[float], name: str) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The preprocessing a pretrained network expects: images are resized so that their shorter side is
    ``resize_size`` (a pair (H, W): resized to exactly that, timm's ``squash``), centre-cropped to
    ``input_size[1:]``, scaled to [0, 1], then normalised with ``mean``/``std`` (done inside the model by
    :class:`NormalizedClassifier`, not by :meth:`image_transform`).

    Args:
        input_size: (C, H, W) of the network's input; ``None``: any size (e.g. an entreg-train classifier).
        mean, std: per-channel normalisation of [0, 1] images (0 and 1: none).
        resize_size: shorter side before the centre crop, or (H, W); ``None``: images are used as they come
            (CIFAR models, and ImageNet-C whose files are already 224 px crops).
        interpolation: one of :data:`INTERPOLATIONS`.

    Example:
        >>> DataConfig((3, 32, 32)).crop_pct is None
        True
    """

    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize_size: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise types once (YAML gives lists)
        if self.input_size is not None:
            size = tuple(int(v) for v in self.input_size)
            if len(size) != 3 or min(size) < 1:
                raise ValueError(f"input_size must be (C, H, W) with positive entries, got {self.input_size!r}")
            set_(self, "input_size", size)
        set_(self, "mean", _floats(self.mean, "mean"))
        set_(self, "std", _floats(self.std, "std"))
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel, got {self.mean} and {self.std}")
        if self.input_size is not None and len(self.mean) != self.input_size[0]:
            raise ValueError(f"mean/std have {len(self.mean)} channels, input_size {self.input_size} has another")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.resize_size is not None:
            if self.input_size is None:
                raise ValueError("resize_size needs input_size (the crop after the resize)")
            resize = (
                int(self.resize_size)
                if isinstance(self.resize_size, (int, float))
                else tuple(int(v) for v in self.resize_size)
            )
            if isinstance(resize, tuple) and len(resize) != 2:
                raise ValueError(f"resize_size must be an int (shorter side) or (H, W), got {self.resize_size!r}")
            set_(self, "resize_size", resize)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def crop_pct(self) -> float | None:
        """Crop size over resize size (timm's ``crop_pct``); ``None`` without a resize."""
        if self.resize_size is None:
            return None
        resize = self.resize_size if isinstance(self.resize_size, int) else self.resize_size[0]
        return self.input_size[1] / resize

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists), for hyperparameters and YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def coerce(cls, value: DataConfig | Mapping[str, Any] | None) -> DataConfig:
        """A DataConfig from itself, a mapping of its fields or ``None`` (no preprocessing)."""
        if isinstance(value, DataConfig):
            return value
        if value is None:
            return cls()
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown DataConfig fields {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(cls)]}"
            )
        return cls(**dict(value))

    @classmethod
    def from_timm(cls, config: Mapping[str, Any]) -> DataConfig:
        """From timm's ``resolve_model_data_config(model)``: the same resize (``floor(size / crop_pct)``), crop
        and interpolation as ``timm.data.create_transform(**config)`` in eval mode (crop modes center, squash)."""
        _, height, width = config["input_size"]
        crop_pct, mode = config.get("crop_pct") or 0.875, config.get("crop_mode") or "center"
        if mode == "squash":
            resize: int | tuple[int, int] = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        elif mode == "center" and height == width:
            resize = math.floor(height / crop_pct)
        else:
            raise ValueError(
                f"timm crop_mode {mode!r} with input_size {config['input_size']} is not supported (supported: "
                "'center' with a square input, 'squash'); pass a DataConfig of your own"
            )
        return cls(config["input_size"], config["mean"], config["std"], resize, config["interpolation"])

    def image_transform(self, resize: bool = True) -> Callable[[Any], Tensor]:
        """PIL image / uint8 HWC array / uint8 CHW tensor -> float CHW tensor in [0, 1]: resize and centre crop
        (unless ``resize=False`` or there is no ``resize_size``), no normalisation (the model does that)."""
        from torchvision.transforms import InterpolationMode, v2

        steps: list[Any] = [_array_to_pil]  # arrays are resized by PIL as the PIL images of ImageFolders are
        if resize and self.resize_size is not None:
            mode = InterpolationMode(self.interpolation)
            steps += [v2.Resize(self.resize_size, mode, antialias=True), v2.CenterCrop(self.input_size[1:])]
        return v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _array_to_pil(image: Any) -> Any:
    """A uint8 HWC (or HW) numpy array as a PIL image; anything else as it is."""
    import numpy as np

    if isinstance(image, np.ndarray):
        from PIL import Image

        return Image.fromarray(image)
    return image


class NormalizedClassifier(nn.Module):
    """``model((x - mean) / std)``, keeping only the logits of ``class_subset`` (in its order) when given: the
    network as the papers evaluate it, fed images in [0, 1]. The network is :attr:`model`.

    Args:
        model: maps normalised images to logits.
        mean, std: per-channel normalisation.
        class_subset: indices of the logits to keep (e.g. ImageNet-R's 200 of 1000); label j is class_subset[j].
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        class_subset: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        subset = None if class_subset is None else torch.as_tensor(list(class_subset), dtype=torch.long)
        if subset is not None and (subset.dim() != 1 or len(subset) < 2 or len(set(subset.tolist())) != len(subset)):
            raise ValueError(f"class_subset must be >= 2 distinct class indices, got {list(class_subset)}")
        if subset is not None and int(subset.min()) < 0:
            raise ValueError(f"class_subset indices must be >= 0, got {subset.tolist()}")
        self.register_buffer("class_subset", subset, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        if self.class_subset is None:
            return logits
        if int(self.class_subset.max()) >= logits.shape[-1]:
            raise ValueError(
                f"class_subset holds index {int(self.class_subset.max())}, the model has {logits.shape[-1]} logits"
            )
        return logits.index_select(-1, self.class_subset)


# ---- weight files --------------------------------------------------------------------------------------------


def _missing_file_error(path: Path, what: str, expected: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}: weights file {str(path)!r} does not exist; expected {expected}")


def _refuse_web_page(path: Path, what: str, expected: str) -> None:
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    if head[:1] == b"<":  # what Google Drive and proxies send instead of the file
        raise WeightsError(
            f"{what}: {str(path)!r} is an HTML/XML page, not a checkpoint (a failed download?); expected {expected}; "
            "download it again"
        )


def read_weights_file(
    path: str | Path, what: str = "weights", expected: str = "a state_dict file", *, weights_only: bool = True
) -> Any:
    """The object in a weights file: ``.safetensors`` through safetensors, anything else through
    ``torch.load(map_location="cpu", weights_only=weights_only)``. A missing file raises FileNotFoundError, an
    unreadable one (truncated, an HTML page, a pickle of whole modules) :class:`WeightsError`, both naming
    ``path``, ``what`` it is for and the ``expected`` format.

    Example:
        >>> read_weights_file("missing.pth", "resnet18", "a torchvision state_dict")
        Traceback (most recent call last):
        ...
        FileNotFoundError: resnet18: weights file 'missing.pth' does not exist; expected a torchvision state_dict
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, what, expected)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"{what}: {str(path)!r} has the suffix {path.suffix!r}; expected {expected} "
            f"(suffixes: {', '.join(WEIGHT_SUFFIXES)})"
        )
    _refuse_web_page(path, what, expected)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        hint = ""
        if weights_only and "weights_only" in str(error):
            hint = (
                "; the file pickles Python objects beyond tensors: if you trust its source, load it with "
                "weights_only=False (this runs code stored in the file)"
            )
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightsError(
            f"{what}: cannot read {str(path)!r} ({type(error).__name__}: {first}); expected {expected}{hint}"
        ) from error


def unwrap_state_dict(
    checkpoint: Any,
    keys: Sequence[str] = ("state_dict", "model_state_dict", "model"),
    prefixes: Sequence[str] = ("module.", "model."),
) -> dict[str, Tensor]:
    """The state_dict inside a checkpoint: the first entry of ``keys`` that holds a mapping (else the checkpoint
    itself), with each of ``prefixes`` stripped in turn from the keys that start with it (``module.`` of
    DataParallel/DDP, ``model.`` of wrappers).

    Example:
        >>> unwrap_state_dict({"state_dict": {"module.fc.weight": 1}, "epoch": 3})
        {'fc.weight': 1}
    """
    if isinstance(checkpoint, Mapping):
        for key in keys:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"expected a state_dict (a mapping of names to tensors), got {type(checkpoint).__name__}")
    state = dict(checkpoint)
    for prefix in prefixes:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_KEYS])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOWN_KEYS else shown


def check_state_dict(
    model: nn.Module,
    state: Mapping[str, Any],
    path: str | Path,
    what: str,
    expected: str,
    optional: Sequence[str] = (),
) -> None:
    """Raise :class:`WeightsError` unless ``state`` has exactly ``model``'s state_dict keys (those in ``optional``
    may be missing; BatchNorm's ``num_batches_tracked`` too, as ``load_state_dict`` fills it for old checkpoints)
    with the same shapes. The message names the file, ``what`` it is for, the ``expected`` format and lists the
    missing, unexpected and mismatched keys.

    Example:
        >>> check_state_dict(nn.Linear(2, 3), {"weight": torch.zeros(3, 2), "b": torch.zeros(3)}, "w.pth",
        ...                  "Linear", "a Linear state_dict")
        Traceback (most recent call last):
        ...
        entreg.nn.pretrained.WeightsError: Linear: ... 'w.pth' ...: missing keys: bias; unexpected keys: b
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in optional and not k.endswith("num_batches_tracked")]
    unexpected = sorted((k for k in state if k not in own), key=lambda k: k.endswith("num_batches_tracked"))
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state and isinstance(state[k], Tensor) and state[k].shape != v.shape
    ]
    problems = [f"missing keys: {_listing(missing)}"] if missing else []
    problems += [f"unexpected keys: {_listing(unexpected)}"] if unexpected else []
    problems += [f"shape mismatches: {_listing(shapes)}"] if shapes else []
    if problems:
        raise WeightsError(
            f"{what}: the weights in {str(path)!r} do not fit the architecture (expected {expected}): "
            + "; ".join(problems)
        )


def load_checked(
    model: nn.Module, state: Mapping[str, Any], path: str | Path, what: str, expected: str, optional: Sequence[str] = ()
) -> nn.Module:
    """:func:`check_state_dict`, then ``model.load_state_dict(state, strict=False)`` (only ``optional`` keys and
    batch counts can be missing by then); returns the model in eval mode."""
    check_state_dict(model, state, path, what, expected, optional)
    model.load_state_dict(state, strict=False)
    return model.eval()


# ---- timm ----------------------------------------------------------------------------------------------------

_TIMM_FORMAT = (
    "a timm state_dict as .safetensors, .pth or .bin (the Hub's model.safetensors / pytorch_model.bin, or "
    "torch.save(model.state_dict()); a training checkpoint dict with 'state_dict' or 'model' works too)"
)


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2 or None (the weights' own), got {num_classes!r}")


def timm_model(
    name: str, file: str | Path, num_classes: int | None = None, **kwargs: Any
) -> tuple[nn.Module, DataConfig]:
    """A timm model with its weights from a local ``file``, through timm's own
    ``pretrained_cfg_overlay=dict(file=...)`` (so timm's key filters apply, no network is used), and the
    preprocessing of its pretrained config (``timm.data.resolve_model_data_config``).

    Args:
        name: a timm model name, with a pretrained tag for its preprocessing (``resnet50.tv_in1k``: torchvision's
            ResNet-50 weights and 256->224 bilinear; untagged names get timm's default tag).
        file: ``.safetensors``, ``.pth`` or ``.bin`` state_dict.
        num_classes: classes of the file's classifier when it differs from the pretrained config's (e.g. a
            fine-tuned head); also set in the overlay, else timm would drop the file's head and keep a random one.
        **kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: an unknown name (close names listed); FileNotFoundError: no such file; :class:`WeightsError`:
            an unreadable file or weights that do not fit (missing/unexpected keys listed).
    """
    import timm

    _check_num_classes(num_classes)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"unknown timm model {name!r}" + (f"; close names: {', '.join(close)}" if close else ""))
    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        raise ValueError(f"timm has no pretrained tag {tag!r} for {arch}; valid: {timm.list_pretrained(f'{arch}.*')}")
    path = Path(file)
    what = f"timm model {name!r}"
    if not path.is_file():
        raise _missing_file_error(path, what, _TIMM_FORMAT)
    if path.suffix not in (".safetensors", ".pth", ".bin", ".pt"):
        hint = " (a JAX .npz: use timm's converted model.safetensors from the Hub)" if path.suffix == ".npz" else ""
        raise WeightsError(f"{what}: {str(path)!r} has the suffix {path.suffix!r}{hint}; expected {_TIMM_FORMAT}")
    _refuse_web_page(path, what, _TIMM_FORMAT)
    overlay: dict[str, Any] = {"file": str(path)}
    if num_classes is not None:
        overlay["num_classes"] = num_classes
        kwargs["num_classes"] = num_classes
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as error:  # say what is wrong with the file, in our words
        _raise_timm_diagnosis(name, path, what, kwargs, error)
        raise
    return net.eval(), DataConfig.from_timm(timm.data.resolve_model_data_config(net))


def _raise_timm_diagnosis(name: str, path: Path, what: str, kwargs: dict[str, Any], error: Exception) -> None:
    """Turn a failed timm load into a :class:`WeightsError` that names the file and the keys."""
    import timm
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))  # timm's own reading and unwrapping
    except Exception as read_error:
        first = str(read_error).strip().splitlines()[0] if str(read_error).strip() else ""
        raise WeightsError(
            f"{what}: cannot read {str(path)!r} ({type(read_error).__name__}: {first}); expected {_TIMM_FORMAT}"
        ) from error
    if not isinstance(error, RuntimeError) or "state_dict" not in str(error):
        return  # not a weights problem: timm's own error says more
    model = timm.create_model(name, pretrained=False, **kwargs)
    check_state_dict(model, state, path, what, _TIMM_FORMAT)
    first = str(error).strip().splitlines()[0]
    raise WeightsError(f"{what}: the weights in {str(path)!r} do not fit ({first}); expected {_TIMM_FORMAT}") from error


# ---- torchvision ---------------------------------------------------------------------------------------------

_TORCHVISION_FORMAT = (
    "a torchvision state_dict (the .pth of torchvision's weights URL, or torch.save(model.state_dict())), "
    "or .safetensors"
)


def torchvision_model(
    name: str, file: str | Path, weights: str | None = None, num_classes: int | None = None, **kwargs: Any
) -> tuple[nn.Module, DataConfig]:
    """A torchvision classification model by name with its state_dict from a local ``file``, and the
    preprocessing of the torchvision weights entry the file holds.

    Args:
        name: e.g. ``resnet50``, ``vit_b_16`` (``torchvision.models.list_models(torchvision.models)``).
        file: the state_dict (``resnet50-0676ba61.pth`` is ``IMAGENET1K_V1``); a dict with ``state_dict`` or
            ``model`` and ``module.`` prefixes are unwrapped.
        weights: the weights entry whose preprocessing and classes apply (``IMAGENET1K_V1``, ``IMAGENET1K_V2``...);
            default ``IMAGENET1K_V1`` where it exists (the TTA papers' models), else ``DEFAULT``.
        num_classes: classes of the file's classifier, when not the entry's.
        **kwargs: passed to ``torchvision.models.get_model``.

    The network gets a ``num_classes`` attribute, as timm's models have.
    """
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    _check_num_classes(num_classes)
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        raise ValueError(
            f"unknown torchvision classification model {name!r}; "
            + (f"close names: {', '.join(close)}" if close else f"valid: {', '.join(names)}")
        )
    enum = torchvision.models.get_model_weights(name)
    entries = list(enum.__members__)
    weights = weights or ("IMAGENET1K_V1" if "IMAGENET1K_V1" in entries else "DEFAULT")
    if weights not in entries:
        raise ValueError(f"{name} has no weights entry {weights!r}; valid: {entries}")
    entry = enum[weights]
    preset = entry.transforms()
    if not isinstance(preset, ImageClassification):
        raise ValueError(f"{name} {weights}: not an image classification preset ({type(preset).__name__})")
    num_classes = num_classes or len(entry.meta["categories"])
    what = f"torchvision model {name!r}"
    state = unwrap_state_dict(read_weights_file(file, what, _TORCHVISION_FORMAT), prefixes=("module.",))
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    net = load_checked(net, state, file, what, _TORCHVISION_FORMAT)
    net.num_classes = num_classes  # as timm's models have it (not in the state_dict)
    crop = preset.crop_size[0]
    data = DataConfig((3, crop, crop), preset.mean, preset.std, preset.resize_size[0], preset.interpolation.value)
    return net, data


def load_pipeline(path: str | Path, torch_dtype: torch.dtype | str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained(path)`` of a local pipeline directory, without downloads; components saved
    as ``null`` are passed as None. Every component in ``torch_dtype`` (default float32: diffusers would load its
    models in float32 and transformers the text encoders in their saved dtype, e.g. float16, which do not mix)."""
    from diffusers import DiffusionPipeline

    path = Path(path).expanduser()
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    index = json.loads(index_file.read_text())
    absent = {k: None for k, v in index.items() if not k.startswith("_") and (v is None or v == [None, None])}
    dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else (torch_dtype or torch.float32)
    return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **absent)  # offline-ok
