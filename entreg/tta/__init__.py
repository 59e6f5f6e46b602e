"""Test-time adaptation methods: one file per published method, all built on :class:`TTAMethod` (with ``source`` and
``bn_adapt``, the rows every table starts with); the benchmark protocols (:mod:`entreg.tta.protocols`) and the
standard table (:mod:`entreg.tta.benchmark`)."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from entreg.tta.base import METHODS, StepInfo, TTAMethod, entropy_margin
from entreg.tta.benchmark import BenchmarkTable, OnlineStats
from entreg.tta.bn_adapt import BNAdapt, NoUpdate
from entreg.tta.come import come_entropy
from entreg.tta.deyo import DeYO
from entreg.tta.eata import EATA, ETA, fisher_information
from entreg.tta.lr_scaling import LR_SCALING, lr_factor
from entreg.tta.ostta import OSTTA
from entreg.tta.protocols import PROTOCOLS, Protocol, Segment, Stream, protocol
from entreg.tta.sar import SAR
from entreg.tta.source import Source
from entreg.tta.stream_loader import segment_loader
from entreg.tta.tent import Tent

__all__ = [
    "EATA",
    "ETA",
    "LR_SCALING",
    "METHODS",
    "OSTTA",
    "PROTOCOLS",
    "SAR",
    "BNAdapt",
    "BenchmarkTable",
    "DeYO",
    "NoUpdate",
    "OnlineStats",
    "Protocol",
    "Segment",
    "Source",
    "StepInfo",
    "Stream",
    "TTAMethod",
    "Tent",
    "build_method",
    "check_method_kwargs",
    "come_entropy",
    "entropy_margin",
    "fisher_information",
    "lr_factor",
    "protocol",
    "segment_loader",
]


def _unknown_method(name: str) -> ValueError:
    close = difflib.get_close_matches(name, METHODS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown test-time adaptation method {name!r}; valid: {sorted(METHODS)}{hint}")


def check_method_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise if ``name`` is not a method or ``kwargs`` holds an argument none of its constructors
    (the method's and, through ``**kwargs``, its base classes') accepts.

    Example:
        >>> check_method_kwargs("eata", {"e_margn": 0.9})
        Traceback (most recent call last):
        ...
        TypeError: EATA got an unexpected argument 'e_margn'; valid: ['d_margin', 'e_margin', ...]
    """
    if name not in METHODS:
        raise _unknown_method(name)
    valid: set[str] = set()
    for cls in METHODS[name].__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        skip = ("self", "model", "num_classes")
        valid |= {p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in skip}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    for key in kwargs:
        if key not in valid:
            raise TypeError(f"{METHODS[name].__name__} got an unexpected argument {key!r}; valid: {sorted(valid)}")


def build_method(name: str, model: nn.Module, num_classes: int, **kwargs: Any) -> TTAMethod:
    """The method called ``name`` (see :data:`METHODS`) on ``model``.

    Example:
        >>> build_method("tnet", nn.BatchNorm2d(3), 10)
        Traceback (most recent call last):
        ...
        ValueError: unknown test-time adaptation method 'tnet'; valid: [...] (did you mean 'tent'?)
    """
    check_method_kwargs(name, kwargs)
    return METHODS[name](model, num_classes, **kwargs)
