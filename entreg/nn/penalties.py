"""Entropy penalties added to a training loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConfidencePenalty"]


class ConfidencePenalty(nn.Module):
    """Confidence penalty of Pereyra et al. 2017 ("Regularizing neural networks by penalizing
    confident output distributions", arXiv 1701.06548): a term that penalises low predictive entropy.

    * plain (``hinge=None``): ``-coef * mean(H)``, i.e. the loss CE - beta H(p);
    * hinge (``hinge=Gamma``): ``coef * mean(max(0, Gamma - H))``: only samples whose entropy is
      below Gamma are pushed up, with the same gradient as the plain form there. (The paper prints
      this term with a minus sign, which would reward confidence; we use the sign that penalises it.)

    ``coef`` can be changed during training (e.g. by a controller); it is validated on every set
    and saved in the state dict.

    Args:
        coef: beta >= 0.
        hinge: optional threshold Gamma >= 0 in nats.

    Example:
        >>> from entreg.entropy import categorical_entropy
        >>> penalty = ConfidencePenalty(coef=0.1)
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> loss = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        >>> loss = loss + penalty(categorical_entropy(logits))
        >>> loss.backward()
    """

    def __init__(self, coef: float = 0.1, hinge: float | None = None) -> None:
        super().__init__()
        if hinge is not None and hinge < 0:
            raise ValueError(f"ConfidencePenalty hinge threshold must be >= 0 nats (or None), got {hinge}")
        self.coef = coef
        self.hinge = hinge

    @property
    def coef(self) -> float:
        return self._coef

    @coef.setter
    def coef(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"ConfidencePenalty coef must be >= 0, got {value}")
        self._coef = float(value)

    def forward(self, entropy: Tensor) -> Tensor:
        """Penalty (a scalar) for per-sample entropies ``entropy``."""
        if self.hinge is None:
            return -self.coef * entropy.mean()
        return self.coef * torch.relu(self.hinge - entropy).mean()

    def get_extra_state(self) -> dict[str, float]:
        return {"coef": self.coef}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.coef = state["coef"]

    def extra_repr(self) -> str:
        return f"coef={self.coef}, hinge={self.hinge}"
