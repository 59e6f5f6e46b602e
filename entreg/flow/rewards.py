"""Rewards for GRPO fine-tuning of flow models, and the guards that catch reward hacking.

A reward is a callable ``reward(samples, cond) -> Tensor`` of shape (B,): float, deterministic, computed from the
final samples (``cond`` the class labels of a class-conditional model, or None). Each one here is an
``nn.Module`` whose tensors are buffers, so ``.to(device)`` moves it; none needs gradients (they flow through if
the caller wants them).

- :class:`RegionReward` (2-D ring toy): ``r(x) = max_m exp(-|x - m|^2 / width)`` over the target modes ``m``,
  so choosing a target mode and landing close to its centre both earn reward.
- :class:`ClassifierReward` (digits): ``r = log p_classifier(c | x)`` for the requested class ``c = cond``;
  :func:`digits_classifier` trains a small frozen classifier (MLP or CNN) on the bundled digits in seconds.
- Hacking guards for the digits: :func:`held_out_accuracy` of a classifier of another architecture and seed,
  and :class:`PCAGaussianLikelihood`, a PCA-Gaussian density of real digits that drops on off-manifold
  (noisy or adversarially perturbed) samples.

Example:
    >>> reward = RegionReward(ring_centers(), targets=(0, 1, 2))
    >>> reward(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]), None).round(decimals=4)  # mode 0 is a target, mode 4 not
    tensor([1., 0.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLASSIFIER_ARCHS",
    "ClassifierReward",
    "PCAGaussianLikelihood",
    "RegionReward",
    "digits_classifier",
    "held_out_accuracy",
    "ring_centers",
]

CLASSIFIER_ARCHS = ("mlp", "cnn")
DIGITS_SHAPE = (1, 8, 8)
DEFAULT_STEPS = {"mlp": 200, "cnn": 100}


def ring_centers(modes: int = 8, radius: float = 4.0) -> Tensor:
    """The (modes, 2) centres of the ring toy: ``radius (cos, sin)(2 pi k / modes)`` for k = 0 .. modes - 1.

    Example:
        >>> ring_centers(4, radius=2.0).round(decimals=4).abs()
        tensor([[2., 0.],
                [0., 2.],
                [2., 0.],
                [0., 2.]])
    """
    if modes < 1 or radius <= 0:
        raise ValueError(f"need modes >= 1 and radius > 0, got {modes=}, {radius=}")
    angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


class RegionReward(nn.Module):
    """``r(x) = max over target modes m of exp(-|x - m|^2 / width)``: 1 at a target centre, about 0 far from all.

    Args:
        centers: (K, D) mode centres (e.g. :func:`ring_centers`).
        targets: indices of the rewarded modes (non-empty, each in [0, K)).
        width: the squared-distance scale (> 0); 0.5 in the E-GRPO benchmark notes.

    Example:
        >>> reward = RegionReward(ring_centers(), targets=(0, 1, 2), width=0.5)
        >>> x = torch.tensor([[4.5, 0.0]])  # 0.5 from the centre of target mode 0
        >>> round(reward(x, None).item(), 4) == round(math.exp(-0.25 / 0.5), 4)
        True
    """

    target_centers: Tensor

    def __init__(self, centers: Tensor, targets: Sequence[int] = (0, 1, 2), width: float = 0.5) -> None:
        super().__init__()
        centers = torch.as_tensor(centers, dtype=torch.float32)
        if centers.ndim != 2 or len(centers) == 0:
            raise ValueError(f"centers must be a non-empty (K, D) tensor, got shape {tuple(centers.shape)}")
        targets = [int(t) for t in targets]
        if not targets:
            raise ValueError("targets must name at least one mode")
        if min(targets) < 0 or max(targets) >= len(centers):
            raise ValueError(f"targets must be mode indices in [0, {len(centers)}), got {targets}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.targets, self.width = tuple(targets), float(width)
        self.register_buffer("target_centers", centers[targets].clone())

    def forward(self, samples: Tensor, cond: Tensor | None = None) -> Tensor:
        if samples.ndim != 2 or samples.shape[1] != self.target_centers.shape[1]:
            raise ValueError(f"samples must be (B, {self.target_centers.shape[1]}), got shape {tuple(samples.shape)}")
        squared = (samples[:, None, :] - self.target_centers.to(samples.dtype)).square().sum(-1)
        return torch.exp(-squared.min(dim=1).values / self.width)

    def extra_repr(self) -> str:
        return f"targets={self.targets}, width={self.width}"


class ClassifierReward(nn.Module):
    """``r = log p_classifier(c | x)`` (log-softmax of the logits at the requested class ``c = cond``).

    The classifier is frozen (``requires_grad_(False)``) and kept in eval mode even when a parent module is put in
    training mode, so the reward stays deterministic.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> reward = ClassifierReward(net)
        >>> x, c = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> torch.allclose(reward(x, c), net(x).log_softmax(-1)[torch.arange(4), c])
        True
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> ClassifierReward:
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, samples: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("ClassifierReward needs cond: the requested class of every sample, a (B,) integer tensor")
        if cond.shape != (len(samples),) or cond.dtype.is_floating_point:
            raise ValueError(
                f"cond must be a ({len(samples)},) integer tensor of classes, got {cond.dtype} {tuple(cond.shape)}"
            )
        logits = self.classifier(samples)
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= logits.shape[1]):
            raise ValueError(f"cond holds classes outside [0, {logits.shape[1]}): {cond.unique().tolist()}")
        return logits.log_softmax(dim=-1).gather(1, cond.long()[:, None]).squeeze(1)


class _AsDigit(nn.Module):
    """Reshapes (B, 64) or (B, 1, 8, 8) inputs to (B, 1, 8, 8)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), *DIGITS_SHAPE)


def _digits_net(arch: str) -> nn.Sequential:
    if arch == "mlp":
        return nn.Sequential(_AsDigit(), nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        _AsDigit(),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def digits_classifier(seed: int = 0, arch: str = "mlp", steps: int | None = None, lr: float = 3e-3) -> nn.Module:
    """A small digits classifier, trained full batch with Adam on the training split of
    :class:`entreg.data.DigitsDataModule` (``size=8, scale="minus_one_one"``, split seed 0 whatever ``seed`` is,
    so every classifier is scored on the same 597 test digits), returned frozen in eval mode.

    It takes (B, 1, 8, 8) or (B, 64) digits in [-1, 1] and returns (B, 10) logits. ``seed`` sets the
    initialisation. ``arch="mlp"``: 64-128-10 with ReLU, 200 steps by default (about 0.4 s on one CPU core);
    ``arch="cnn"``: two 3x3 convolutions (8 channels, then 16 with stride 2) and a linear head, 100 steps
    by default (about 1.6 s). Test accuracy (597 held-out digits), measured with the defaults for seeds 0, 1, 2:
    mlp 0.970, 0.970, 0.963; cnn 0.965, 0.968, 0.970. Use one as the reward and another architecture and seed
    as the held-out judge (:func:`held_out_accuracy`). The judge catches small adversarial perturbations that
    fool only the reward classifier, not large ones: 20 signed-gradient steps of 0.05 on the mlp reward toward
    another class fool the cnn too (accuracy 1.0 on the requested classes); :class:`PCAGaussianLikelihood`
    flags those.

    Example:
        >>> net = digits_classifier(steps=5)
        >>> net(torch.zeros(3, 1, 8, 8)).shape, net.training
        (torch.Size([3, 10]), False)
    """
    if arch not in CLASSIFIER_ARCHS:
        raise ValueError(f"arch must be one of {CLASSIFIER_ARCHS}, got {arch!r}")
    steps = DEFAULT_STEPS[arch] if steps is None else steps
    if steps < 0 or not lr > 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got {steps=}, {lr=}")
    from entreg.data import DigitsDataModule

    datamodule = DigitsDataModule(size=8, scale="minus_one_one", seed=0)
    datamodule.setup("fit")
    x, y = datamodule.train_set.tensors
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _digits_net(arch)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def held_out_accuracy(classifier: nn.Module, samples: Tensor, cond: Tensor) -> float:
    """The fraction of ``samples`` that ``classifier`` assigns to their requested class ``cond`` (argmax of its
    logits). With a classifier other than the reward's, a rising reward with a flat accuracy flags reward hacking.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.eye(2)), net[1].bias.zero_()
        >>> held_out_accuracy(net, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
        0.5
    """
    if cond.shape != (len(samples),) or len(samples) == 0:
        raise ValueError(
            f"need a non-empty batch and one class per sample, got samples {tuple(samples.shape)}, "
            f"cond {tuple(cond.shape)}"
        )
    return (classifier(samples).argmax(dim=-1) == cond).float().mean().item()


class PCAGaussianLikelihood(nn.Module):
    """A PCA-Gaussian density fitted to data: mean ``mu``, the top ``components`` principal directions ``V`` with
    their variances ``lambda_i``, and one isotropic variance ``s2`` (the mean of the discarded eigenvalues, the
    probabilistic-PCA estimate) for everything orthogonal to them:

        log p(x) = -1/2 [sum_i z_i^2 / lambda_i + |r|^2 / s2 + sum_i log lambda_i + (D - k) log s2 + D log 2 pi],

    with ``z = V^T (x - mu)`` and ``r = x - mu - V z``. Off-manifold samples (noise, adversarial perturbations)
    put energy in low-variance directions and score far lower than real data. Variances are floored at
    ``min_variance``. Measured with :meth:`from_digits` (16 components), in nats per dimension: test digits
    -0.34 on average (lowest -1.55), uniform noise in [-1, 1] -5.15 (highest -3.06), digits pushed toward another
    class by 20 signed-gradient steps of 0.05 on the mlp :func:`digits_classifier` reward -1.26.

    Args:
        data: (N, ...) samples to fit (flattened to (N, D)), e.g. the digits training split.
        components: number of principal components k (1 <= k < D, k < N).
        min_variance: floor of every variance.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> data = torch.randn(500, 2, generator=g) @ torch.tensor([[3.0, 0.0], [0.0, 0.1]])
        >>> model = PCAGaussianLikelihood(data, components=1)
        >>> on, off = model.log_likelihood(torch.tensor([[3.0, 0.0], [0.0, 3.0]])).tolist()
        >>> on > off
        True
    """

    mean: Tensor
    basis: Tensor
    variances: Tensor
    residual_variance: Tensor

    def __init__(self, data: Tensor, components: int = 16, min_variance: float = 1e-6) -> None:
        super().__init__()
        if data.ndim < 2:
            raise ValueError(f"data must be (N, ...) with at least 2 dimensions, got shape {tuple(data.shape)}")
        flat = data.detach().reshape(len(data), -1).double()
        n, d = flat.shape
        if not 1 <= components < min(d, n):
            raise ValueError(f"components must be in [1, min(D, N) = {min(d, n)}), got {components}")
        if not min_variance > 0:
            raise ValueError(f"min_variance must be > 0, got {min_variance}")
        self.components, self.dim = components, d
        mean = flat.mean(0)
        _, singular, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        eigenvalues = singular.square() / (n - 1)  # the len(singular) = min(N, D) non-trivial ones
        residual = eigenvalues[components:].sum() / (d - components)  # the other D - min(N, D) are 0
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", vh[:components].T.contiguous().float())
        self.register_buffer("variances", eigenvalues[:components].clamp_min(min_variance).float())
        self.register_buffer("residual_variance", residual.clamp_min(min_variance).float())

    @classmethod
    def from_digits(cls, components: int = 16) -> PCAGaussianLikelihood:
        """Fitted on the 1,000 training digits of :class:`entreg.data.DigitsDataModule` (``size=8``,
        ``scale="minus_one_one"``, split seed 0)."""
        from entreg.data import DigitsDataModule

        datamodule = DigitsDataModule(size=8, scale="minus_one_one", seed=0)
        datamodule.setup("fit")
        return cls(datamodule.train_set.tensors[0], components)

    def log_likelihood(self, samples: Tensor, reduce: str = "mean") -> Tensor:
        """(B,) log-density of every sample: nats per dimension (``reduce="mean"``, the default, comparable
        across data sizes) or the total log-density (``reduce="sum"``, D times larger)."""
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        flat = samples.reshape(len(samples), -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"samples must have {self.dim} values each, got shape {tuple(samples.shape)}")
        centred = flat.to(self.mean.dtype) - self.mean
        z = centred @ self.basis
        residual = centred - z @ self.basis.T
        k = self.components
        total = -0.5 * (
            (z.square() / self.variances).sum(-1)
            + residual.square().sum(-1) / self.residual_variance
            + self.variances.log().sum()
            + (self.dim - k) * self.residual_variance.log()
            + self.dim * math.log(2 * math.pi)
        )
        return total / self.dim if reduce == "mean" else total

    def forward(self, samples: Tensor) -> Tensor:
        return self.log_likelihood(samples)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}"
