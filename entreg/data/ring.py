"""A ring of Gaussians as a labelled DataModule: the 2-D toy of flow-matching training and GRPO fine-tuning."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from entreg.data.base import SplitDataModule

__all__ = ["RingDataModule", "ring_centers", "ring_mixture"]


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


def ring_mixture(modes: int = 8, radius: float = 4.0, std: float = 0.25) -> Any:
    """The ring as an equally weighted :class:`entreg.diffusion.GaussianMixture` (exact log-density), e.g. the
    ``reference_mixture`` of a flow or diffusion module; centres :func:`ring_centers`.

    Example:
        >>> ring_mixture(4, radius=2.0, std=0.5).means.round(decimals=4).abs()
        tensor([[2., 0.],
                [0., 2.],
                [2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    from entreg.diffusion.gmm import GaussianMixture  # the package's __init__ imports diffusers

    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    centers = ring_centers(modes, radius).double()
    return GaussianMixture(torch.ones(modes), centers, torch.zeros(modes, 2, 1), std)


class RingDataModule(SplitDataModule):
    """Float32 points ``(x, mode)`` of ``modes`` equally likely isotropic Gaussians (std ``std``) centred on a
    circle of radius ``radius``: centre k at ``radius (cos, sin)(2 pi k / modes)``, ``self.centers`` (modes, 2).
    The label is the mode a point was drawn from, so class-conditional models can ask for a mode
    (``num_classes = modes``). The train, val and test sets (the test set as large as the validation set) are
    independent seeded draws; ``self.mixture`` is the exact density (:func:`ring_mixture`).

    Args:
        modes: Gaussians on the ring (>= 1).
        radius: radius of the circle (> 0).
        std: standard deviation of each Gaussian (> 0).
        n_train: training points.
        n_val: validation points (and test points).
        batch_size: per-process batch size.
        seed: seed of the draws and the training order.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).

    Example:
        >>> dm = RingDataModule(n_train=100, n_val=20, batch_size=32)
        >>> dm.setup("fit")
        >>> x, mode = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, mode.dtype, tuple(dm.centers.shape)
        ((32, 2), torch.float32, torch.int64, (8, 2))
    """

    dim = 2

    def __init__(
        self,
        modes: int = 8,
        radius: float = 4.0,
        std: float = 0.25,
        n_train: int = 4000,
        n_val: int = 1000,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if n_train < 1 or n_val < 1:
            raise ValueError(f"n_train and n_val must be >= 1, got {n_train} and {n_val}")
        self.mixture = ring_mixture(modes, radius, std)  # validates modes, radius and std
        self.save_hyperparameters()
        self.num_classes, self.std, self.n_train, self.n_val = modes, std, n_train, n_val
        self.centers = self.mixture.means.float()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed + 1)
        n = self.n_train + 2 * self.n_val
        modes = torch.randint(0, self.num_classes, (n,), generator=generator)
        points = self.centers[modes] + self.std * torch.randn(n, 2, generator=generator)
        sizes = [self.n_train, self.n_val, self.n_val]
        train, val, test = (TensorDataset(x, y) for x, y in zip(points.split(sizes), modes.split(sizes), strict=True))
        self.train_set, self.val_set, self.test_set = train, val, test
