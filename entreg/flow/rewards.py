"""Rewards for GRPO fine-tuning of flow models, and the guards that catch reward hacking.

A reward is a callable ``reward(samples, cond) -> Tensor`` of shape (B,): float, deterministic, computed from the
final samples (``cond`` the class labels of a class-conditional model, or None). Each one here is an
``nn.Module`` whose tensors are buffers, so ``.to(device)`` moves it; none needs gradients (they flow through if
the caller wants them).

- :class:`RegionReward` (2-D ring toy): ``r(x) = max_m exp(-|x - m|^2 / width)`` over the target modes ``m``,
  so choosing a target mode and landing close to its centre both earn reward.
- :class:`ClassifierReward` (digits): ``r = log p_classifier(c | x)`` for the requested class ``c = cond``;
  :func:`entreg.data.digits_nets.digits_classifier` trains a small frozen classifier (MLP or CNN) on the
  bundled digits in seconds.
- Hacking guards for the digits: :func:`held_out_accuracy` of a classifier of another architecture and seed,
  and :class:`PCAGaussianLikelihood` (:mod:`entreg.nn.density`, re-exported here), a PCA-Gaussian density of
  real digits that drops on off-manifold (noisy or adversarially perturbed) samples
  (:func:`entreg.data.digits_nets.digits_pca_likelihood`); :class:`HackingGuards` reports both with the
  within-class diversity (the ``eval_metrics`` of ``reward=digits_classifier``).

Example:
    >>> from entreg.data.ring import ring_centers
    >>> reward = RegionReward(ring_centers(), targets=(0, 1, 2))
    >>> reward(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]), None).round(decimals=4)  # mode 0 is a target, mode 4 not
    tensor([1., 0.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from entreg.flow.diversity import mean_pairwise_distance
from entreg.nn.density import PCAGaussianLikelihood

__all__ = [
    "ClassifierReward",
    "HackingGuards",
    "PCAGaussianLikelihood",
    "RegionReward",
    "held_out_accuracy",
]


class RegionReward(nn.Module):
    """``r(x) = max over target modes m of exp(-|x - m|^2 / width)``: 1 at a target centre, about 0 far from all.

    Args:
        centers: (K, D) mode centres (e.g. :func:`entreg.data.ring.ring_centers`).
        targets: indices of the rewarded modes (non-empty, each in [0, K)).
        width: the squared-distance scale (> 0); 0.5 in the E-GRPO benchmark notes.

    Example:
        >>> import math
        >>> from entreg.data.ring import ring_centers
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


class HackingGuards:
    """``metrics(samples, cond) -> {"held_out_accuracy", "pca_log_likelihood", "pairwise_distance"}`` for
    class-conditional samples: the guards against reward hacking, :func:`held_out_accuracy` of ``judge`` (a
    classifier of another architecture and seed than the reward's) and the mean log-likelihood of ``density``
    (nats per pixel), and the diversity, :func:`entreg.flow.diversity.mean_pairwise_distance` within each class.
    The ``eval_metrics`` of :class:`entreg.modules.grpo.GRPOModule` (``configs/reward/digits_classifier.yaml``:
    the cnn :func:`entreg.data.digits_nets.digits_classifier` of seed 1 and
    :func:`entreg.data.digits_nets.digits_pca_likelihood`). The judge and the density run on their own device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> data = torch.randn(200, 2, generator=g)
        >>> judge = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = judge.weight.copy_(torch.eye(2)), judge.bias.zero_()
        >>> guards = HackingGuards(judge, PCAGaussianLikelihood(data, components=1))
        >>> samples, cond = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), torch.tensor([0, 1, 1])
        >>> metrics = guards(samples, cond)
        >>> metrics["held_out_accuracy"], metrics["pairwise_distance"]  # 2 of 3 argmaxes right; class 1: |(2, -1)|
        (0.6666666865348816, 2.23606797749979)
    """

    def __init__(self, judge: nn.Module, density: PCAGaussianLikelihood) -> None:
        self.judge, self.density = judge.eval().requires_grad_(False), density

    @torch.no_grad()
    def __call__(self, samples: Tensor, cond: Tensor | None) -> dict[str, float]:
        if cond is None:
            raise ValueError(
                "HackingGuards needs cond: the requested class of every sample (a class-conditional model)"
            )
        judge_device = next(self.judge.parameters(), samples).device
        density_device = next(self.density.buffers(), samples).device
        return {
            "held_out_accuracy": held_out_accuracy(self.judge, samples.to(judge_device), cond.to(judge_device)),
            "pca_log_likelihood": float(self.density.log_likelihood(samples.to(density_device)).mean()),
            "pairwise_distance": mean_pairwise_distance(samples, cond),
        }
