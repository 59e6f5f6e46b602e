"""Entropy of the distributions that models produce, as plain tensor functions (torch only).

All entropies are in nats. Half-precision inputs (fp16/bf16) are computed in float32 and the
result is returned in float32; gradients flow back to the input in its own dtype.

Example:
    >>> import torch
    >>> from entreg.entropy import categorical_entropy
    >>> h = categorical_entropy(torch.zeros(2, 4))  # uniform over 4 classes
    >>> torch.allclose(h, torch.full((2,), 4.0).log())
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "attention_entropy",
    "categorical_entropy",
    "entropy_from_probs",
    "gaussian_entropy",
    "marginal_entropy",
    "spectral_entropy",
    "von_neumann_entropy",
]

HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)  # entropy of N(0, 1) in nats


def _as_float(x: Tensor) -> Tensor:
    """Upcast half precision (and integers) to float32; keep float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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


def marginal_entropy(logits: Tensor, dim: int = -1, batch_dim: int = 0) -> Tensor:
    """Entropy of the batch-mean prediction, H(mean_b softmax(logits_b)).

    High when a batch spreads its predictions over many classes (used by diversity terms in
    test-time adaptation). Computed in log space: log mean_b p_b = logsumexp_b log p_b - log B.

    Example:
        >>> marginal_entropy(torch.tensor([[9.0, -9.0], [-9.0, 9.0]]))  # two confident, opposite
        tensor(0.6931)
    """
    z = _as_float(logits)
    dim, batch_dim = dim % z.ndim, batch_dim % z.ndim
    if dim == batch_dim:
        raise ValueError(f"marginal_entropy: the class dim and batch_dim must differ, both are {dim}")
    # clamped so that a class masked (-inf) in every sample gives zero gradient, not NaN
    log_p = torch.log_softmax(z, dim=dim).clamp(min=torch.finfo(z.dtype).min)
    log_mean = torch.logsumexp(log_p, dim=batch_dim) - math.log(z.shape[batch_dim])
    return categorical_entropy(log_mean, dim=dim - int(batch_dim < dim))


def von_neumann_entropy(features: Tensor, normalize: bool = False) -> Tensor:
    """Von Neumann entropy (VNE) of a batch of representations, as in Kim et al., CVPR 2023.

    The rows of ``features`` (N x d) are L2-normalised to Z; the autocorrelation
    rho = Z^T Z / N has unit trace, and VNE = -sum_j lambda_j log lambda_j over its eigenvalues.
    The eigenvalues are the squared singular values of Z / sqrt(N), so no d x d matrix is formed.
    High VNE means the representation spreads over many directions (rank and isotropy).

    Args:
        features: (N, d) batch of feature vectors; extra dimensions are flattened into d.
        normalize: divide by log(min(N, d)), the largest possible value, to get a value in [0, 1].

    Example:
        >>> von_neumann_entropy(torch.eye(4))  # four orthogonal directions: log 4
        tensor(1.3863)
    """
    if features.ndim < 2:
        raise ValueError(f"von_neumann_entropy needs (N, d) features, got shape {tuple(features.shape)}")
    h = _as_float(features).flatten(1)
    n, d = h.shape
    z = torch.nn.functional.normalize(h, dim=1) / math.sqrt(n)
    eig = torch.linalg.svdvals(z).square()
    vne = entropy_from_probs(eig)
    return vne / math.log(min(n, d)) if normalize and min(n, d) > 1 else vne


def spectral_entropy(matrix: Tensor) -> Tensor:
    """Entropy -sum lambda log lambda of the eigenvalues of a symmetric PSD matrix scaled to unit trace.

    With ``matrix`` = sum over samples of z z^T for L2-normalised features z (a Gram matrix that
    can be summed over batches and DDP ranks), this is the von Neumann entropy of all those
    samples at once: equal to :func:`von_neumann_entropy` of the stacked features.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(16, 3), dim=1)
        >>> torch.allclose(spectral_entropy(z.T @ z), von_neumann_entropy(z), atol=1e-5)
        True
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"spectral_entropy needs a square matrix, got shape {tuple(matrix.shape)}")
    m = _as_float(matrix)
    eig = torch.linalg.eigvalsh(m / m.diagonal().sum()).clamp(min=0.0)
    return entropy_from_probs(eig / eig.sum())


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


def attention_entropy(attn: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy of attention weights (probabilities that sum to 1 along ``dim``).

    Zero weights (e.g. causal masks) contribute 0 and get zero gradient. Returns one entropy
    per query (``dim`` removed); average it over heads/queries as the analysis needs.

    Example:
        >>> attention_entropy(torch.tensor([[0.5, 0.5, 0.0]]))
        tensor([0.6931])
    """
    return entropy_from_probs(attn, dim)
