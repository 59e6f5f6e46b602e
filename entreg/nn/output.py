"""Output activations of a classifier, built by name (``"none"`` or ``"era"``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from entreg.nn.era import ERA

__all__ = ["OUTPUT_ACTIVATIONS", "build_output_activation"]

OUTPUT_ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "none": lambda num_classes: nn.Identity(),
    "era": ERA,
}


def build_output_activation(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The output activation ``name`` for ``num_classes`` logits; ``kwargs`` go to its constructor.

    Example:
        >>> build_output_activation("era", num_classes=10, target_entropy=0.3)
        ERA(num_classes=10, target_entropy=0.3, tau=4.0, apply_at_eval=True, lambert_w='approx')
    """
    if name not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"Unknown output activation {name!r}; valid: {', '.join(OUTPUT_ACTIVATIONS)}")
    if name == "none" and kwargs:
        raise ValueError(f"output activation 'none' takes no arguments, got {sorted(kwargs)}")
    return OUTPUT_ACTIVATIONS[name](num_classes=num_classes, **kwargs)
