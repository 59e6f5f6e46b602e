"""Take the tensor of interest from a module's output (a tensor, dict, tuple or output object)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["OutputKey", "select_output"]

OutputKey = str | int | None


def select_output(output: Any, key: OutputKey, where: str) -> Tensor:
    """The tensor in a module's ``output``: the output itself (``key=None``), ``output[key]`` for a
    dict or tuple, or the attribute ``key`` of an output object (e.g. ``.logits``); ``where`` names
    the caller in the error messages.

    Example:
        >>> import torch
        >>> select_output({"logits": torch.ones(2)}, "logits", "demo")
        tensor([1., 1.])
        >>> select_output((torch.ones(1),), 3, "demo")
        Traceback (most recent call last):
        ...
        KeyError: 'demo: output has no entry 3; valid: 0..0'
    """
    if key is None:
        value = output
    elif isinstance(output, Mapping) or (isinstance(key, int) and isinstance(output, (tuple, list))):
        try:
            value = output[key]
        except (KeyError, IndexError):
            valid = list(output) if isinstance(output, Mapping) else f"0..{len(output) - 1}"
            raise KeyError(f"{where}: output has no entry {key!r}; valid: {valid}") from None
    elif isinstance(key, str) and hasattr(output, key):
        value = getattr(output, key)
    else:
        raise KeyError(f"{where}: cannot take {key!r} from an output of type {type(output).__name__}")
    if not isinstance(value, Tensor):
        hint = " (set output_key to the entry that holds the tensor)" if key is None else ""
        raise TypeError(f"{where}: expected a tensor, got {type(value).__name__}{hint}")
    return value
