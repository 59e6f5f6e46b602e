"""The learning-rate rules of the reference implementations, for a batch size other than the one an lr was tuned at.

Every method takes ``lr_scaling`` and ``reference_batch_size`` (see :class:`~entreg.tta.TTAMethod`): ``lr`` is the
learning rate at ``reference_batch_size``, and the method rescales its optimizer's learning rates once it sees the
size of its first batch (summed over DDP ranks).
"""

from __future__ import annotations

__all__ = ["LR_SCALING", "lr_factor"]

LR_SCALING = ("linear", "sar")


def lr_factor(rule: str | None, batch_size: int, reference_batch_size: int = 64) -> float:
    """The factor on an lr tuned at ``reference_batch_size`` for ``batch_size``:

    * ``None``: 1 (the lr as given);
    * ``"linear"``: ``batch_size / reference_batch_size`` (Goyal et al. 2017; SAR's and DeYO's ``main.py`` for
      ViT-B: ``lr = 0.001 / 64 * bs``);
    * ``"sar"``: SAR's and DeYO's ResNet rule (their ``main.py``: ``lr = 0.00025 / 64 * bs * 2 if bs < 32 else
      0.00025``): 1 from half the reference batch on, else ``2 * batch_size / reference_batch_size``.

    Example:
        >>> lr_factor("linear", 16), lr_factor("sar", 16), lr_factor("sar", 32), lr_factor(None, 1)
        (0.25, 0.5, 1.0, 1.0)
    """
    if rule is not None and rule not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING} or None, got {rule!r}")
    for name, value in (("batch_size", batch_size), ("reference_batch_size", reference_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if rule == "linear":
        return batch_size / reference_batch_size
    if rule == "sar":
        return 1.0 if 2 * batch_size >= reference_batch_size else 2 * batch_size / reference_batch_size
    return 1.0
