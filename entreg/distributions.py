"""The distributions the package uses, as plain tensor functions (torch only): entropies, log-densities, samplers.

* categorical: :func:`categorical_entropy` from logits, :func:`entropy_from_probs` from probabilities and
  :func:`categorical_entropy_of` for an output in either format;
* diagonal Gaussian: :func:`gaussian_log_prob` and :func:`gaussian_entropy`;
* Gaussian squashed by tanh (SAC): :func:`tanh_gaussian_log_prob`;
* Gaussian truncated to [-1, 1] (ERA's SAC): :func:`truncated_gaussian_sample`.

All entropies are in nats. Half-precision inputs (fp16/bf16) of the entropies are computed in float32 and the
result is returned in float32; gradients flow back to the input in its own dtype. The log-densities compute in
the inputs' dtype. :mod:`entreg.entropy` re-exports the entropies.

Example:
    >>> import torch
    >>> h = categorical_entropy(torch.zeros(2, 4))  # uniform over 4 classes
    >>> torch.allclose(h, torch.full((2,), 4.0).log())
    True
    >>> gaussian_log_prob(torch.zeros(3), torch.zeros(3), log_std=torch.zeros(3))  # 3 * log N(0; 0, 1)
    tensor(-2.7568)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HALF_LOG_2PI_E",
    "LOG_SQRT_2PI",
    "CategoricalFormat",
    "categorical_entropy",
    "categorical_entropy_of",
    "entropy_from_probs",
    "gaussian_entropy",
    "gaussian_log_prob",
    "tanh_gaussian_log_prob",
    "truncated_gaussian_sample",
]

HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)  # entropy of N(0, 1) in nats
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)  # -log N(0; 0, 1)
LOG_2 = math.log(2.0)
CategoricalFormat = Literal["logits", "probs"]


def _as_float(x: Tensor) -> Tensor:
    """Upcast half precision (and integers) to float32; keep float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# --- categorical -------------------------------------------------------------------------------------------------


class _CategoricalEntropy(torch.autograd.Function):
    """Entropy of softmax(z) along the last dimension with a hand-written backward.

    dH/dz = -p * (log p + H): one pass over the saved tensors instead of autograd's chain through
    exp, mul and log_softmax. ``log p`` is clamped to the dtype's lowest finite value so that
    masked (-inf) logits give 0 * finite = 0 instead of NaN, while a NaN logit still gives NaN.
    The backward is not itself differentiable: second derivatives raise instead of being wrong.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        log_p = torch.log_softmax(logits, dim=-1).clamp_(min=torch.finfo(logits.dtype).min)
        p = log_p.exp()
        h = 0.0 - torch.linalg.vecdot(p, log_p)  # 0 - x, not -x: a one-hot row gives +0, not -0
        ctx.save_for_backward(p, log_p, h)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: Tensor) -> Tensor:  # type: ignore[override]
        p, log_p, h = ctx.saved_tensors
        grad = log_p + h.unsqueeze(-1)
        return grad.mul_(p).mul_(grad_h.neg().unsqueeze(-1))


def categorical_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` along ``dim``.

    Stable for any finite logits (e.g. +-1e4) and for masked ``-inf`` entries; a row of all
    ``-inf`` or containing NaN yields NaN. The gradient is exact (``-p * (log p + H)``).

    Args:
        logits: unnormalised log-probabilities, any shape.
        dim: the class dimension.

    Returns:
        Entropy with ``dim`` removed, float32 for half inputs.

    Example:
        >>> categorical_entropy(torch.tensor([[1e4, 0.0, -1e4]]))
        tensor([0.])
    """
    z = _as_float(logits)
    if z.ndim == 0 or z.shape[dim] == 0:
        raise ValueError(f"categorical_entropy needs a non-empty class dimension, got shape {tuple(z.shape)}")
    z = z.movedim(dim, -1) if dim not in (-1, z.ndim - 1) else z
    return _CategoricalEntropy.apply(z)


def entropy_from_probs(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy -sum p log p of probabilities along ``dim``.

    Zero entries contribute 0 to the value and get a zero gradient (not NaN), so the result can
    be used as a penalty on sparse distributions.

    Example:
        >>> entropy_from_probs(torch.tensor([[0.5, 0.5, 0.0]]))
        tensor([0.6931])
    """
    p = _as_float(probs)
    tiny = torch.finfo(p.dtype).tiny
    return -torch.where(p > 0, p * p.clamp(min=tiny).log(), 0.0).sum(dim)


def categorical_entropy_of(output: Tensor, input_format: CategoricalFormat = "logits", dim: int = -1) -> Tensor:
    """Entropy along ``dim`` of a categorical distribution given as ``"logits"`` (log-probabilities also work:
    :func:`categorical_entropy`) or as ``"probs"`` (:func:`entropy_from_probs`).

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> torch.allclose(categorical_entropy_of(z), categorical_entropy_of(z.softmax(-1), "probs"))
        True
    """
    if input_format == "logits":
        return categorical_entropy(output, dim=dim)
    if input_format == "probs":
        return entropy_from_probs(output, dim=dim)
    raise ValueError(f"input_format must be 'logits' or 'probs', got {input_format!r}")


# --- Gaussian ----------------------------------------------------------------------------------------------------


def gaussian_entropy(log_std: Tensor, dim: int | tuple[int, ...] | None = -1) -> Tensor:
    """Differential entropy of a diagonal Gaussian with the given log standard deviations.

    H = sum_i (log sigma_i + 0.5 * log(2 pi e)) over ``dim``; ``dim=None`` returns the
    per-dimension entropies unreduced.

    Example:
        >>> gaussian_entropy(torch.zeros(3))  # three unit-variance dimensions
        tensor(4.2568)
    """
    per_dim = _as_float(log_std) + HALF_LOG_2PI_E
    return per_dim if dim is None else per_dim.sum(dim)


def gaussian_log_prob(
    x: Tensor,
    mean: Tensor,
    log_std: Tensor | None = None,
    std: Tensor | float | None = None,
    dim: int | tuple[int, ...] | None = -1,
) -> Tensor:
    """log N(x; mean, diag(sigma^2)), summed over ``dim`` (``None``: per dimension), in the inputs' dtype.

    sigma is given as ``log_std``, ``std`` or both, and the arithmetic follows what is given (the results agree
    to rounding; each caller keeps the rounding it always had):

    * ``log_std``: ``-z^2 / 2 - log_std - log sqrt(2 pi)`` with ``z = (x - mean) exp(-log_std)`` (the policies);
    * ``std`` (a tensor or a number): ``-(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``, the arithmetic
      of ``torch.distributions.Normal`` (the flow SDE's transitions);
    * both, when the caller has exp(log_std) already: as with ``log_std``, ``z = (x - mean) / std``.

    Example:
        >>> x, mean = torch.tensor([[0.5, -1.0]]), torch.zeros(1, 2)
        >>> a = gaussian_log_prob(x, mean, log_std=torch.zeros(1, 2))
        >>> b = torch.distributions.Normal(mean, 1.0).log_prob(x).sum(-1)
        >>> torch.allclose(a, b), torch.allclose(gaussian_log_prob(x, mean, std=1.0), b)
        (True, True)
    """
    if std is None:
        if log_std is None:
            raise ValueError("gaussian_log_prob needs log_std or std")
        quadratic = -0.5 * ((x - mean) * torch.exp(-log_std)).square()
    elif log_std is None:
        std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
        quadratic, log_std = -((x - mean) ** 2) / (2 * std**2), std.log()
    else:
        quadratic = -0.5 * ((x - mean) / std).square()
    per_dim = quadratic - log_std - LOG_SQRT_2PI
    return per_dim if dim is None else per_dim.sum(dim)


def tanh_gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Log-density of a = tanh(u) for u ~ N(mean, exp(log_std)^2), summed over the last dim.

    log pi(a) = log N(u) - sum_i log(1 - tanh(u_i)^2), the last term written as 2 (log 2 - u - softplus(-2u)) so
    it stays finite where tanh saturates (Stable-Baselines3 adds 1e-6 inside the log instead).

    Example:
        >>> tanh_gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))  # tanh'(0) = 1
        tensor([-1.8379])
    """
    log_normal = gaussian_log_prob(u, mean, log_std, dim=None)
    log_jacobian = 2.0 * (LOG_2 - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2)
    return (log_normal - log_jacobian).sum(-1)


def truncated_gaussian_sample(centre: Tensor, log_std: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
    """Reparameterised sample of N(centre, exp(log_std)^2) truncated to [-1, 1] and its log-density (summed over
    the last dim), from ``uniform`` noise in (0, 1) by the inverse CDF. ``centre`` must lie in [-1, 1].

    Computed in the inputs' dtype. The CDF value is kept inside (0, 1) (in float32 at most 1 - 2^-24, which cuts
    the Gaussian's tail beyond about 5.3 std above the centre: a probability below 1e-7), so the inverse CDF and
    its gradient stay finite; the sample is clamped to [-1, 1] against rounding.

    Example:
        >>> x, log_prob = truncated_gaussian_sample(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 0.5))
        >>> bool(x.abs() < 1e-6), round(float(log_prob), 4)  # the median 0; log of N(0; 0, 1) / P(|z| < 1)
        (True, -0.5372)
    """
    finfo = torch.finfo(centre.dtype)
    s = torch.exp(log_std)
    cdf_low = torch.special.ndtr((-1.0 - centre) / s)
    mass = torch.special.ndtr((1.0 - centre) / s) - cdf_low
    p = (cdf_low + uniform * mass).clamp(finfo.tiny, 1.0 - finfo.eps / 2)
    x = (centre + s * torch.special.ndtri(p)).clamp(-1.0, 1.0)
    log_prob = (gaussian_log_prob(x, centre, log_std, std=s, dim=None) - torch.log(mass)).sum(-1)
    return x, log_prob
