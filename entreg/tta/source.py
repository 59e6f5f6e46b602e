"""Source: the model as trained, no adaptation (BatchNorm on its running statistics): the first row of every
test-time adaptation table."""

from __future__ import annotations

from entreg.tta.bn_adapt import NoUpdate

__all__ = ["Source"]


class Source(NoUpdate):
    """The unadapted model, as a method, so that the source row runs through the same code as every other row.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> logits, info = Source(net, num_classes=4).adapt(torch.randn(2, 3, 5, 5))
        >>> net[1].running_mean is None, info.loss
        (False, None)
    """

    name = "source"
