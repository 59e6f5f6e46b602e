"""Entropy of what models produce, as plain tensor functions (torch only): of one distribution per sample
(categorical, Gaussian: defined in :mod:`entreg.distributions` and re-exported here), of a batch's mean prediction,
of representations (von Neumann, spectral) and of attention weights.

All entropies are in nats. Half-precision inputs (fp16/bf16) are computed in float32 and the
result is returned in float32; gradients flow back to the input in its own dtype.

Example:
    >>> import torch
    >>> from entreg.entropy import categorical_entropy, marginal_entropy
    >>> z = torch.tensor([[9.0, -9.0], [-9.0, 9.0]])  # two confident predictions of different classes
    >>> round(float(categorical_entropy(z).mean()), 4), round(float(marginal_entropy(z)), 4)
    (0.0, 0.6931)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entreg.distributions import _as_float, categorical_entropy, entropy_from_probs, gaussian_entropy

__all__ = [
    "attention_entropy",
    "categorical_entropy",
    "entropy_from_probs",
    "gaussian_entropy",
    "marginal_entropy",
    "spectral_entropy",
    "von_neumann_entropy",
]


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


def attention_entropy(attn: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy of attention weights (probabilities that sum to 1 along ``dim``).

    Zero weights (e.g. causal masks) contribute 0 and get zero gradient. Returns one entropy
    per query (``dim`` removed); average it over heads/queries as the analysis needs.

    Example:
        >>> attention_entropy(torch.tensor([[0.5, 0.5, 0.0]]))
        tensor([0.6931])
    """
    return entropy_from_probs(attn, dim)
