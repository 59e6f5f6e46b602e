"""Samples of a random Gaussian mixture as a DataModule: the exactly solvable diffusion benchmark."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from entreg.data.base import SplitDataModule

__all__ = ["GaussianMixtureDataModule"]


class GaussianMixtureDataModule(SplitDataModule):
    """Float32 points ``(x,)`` drawn from ``GaussianMixture.random(dim, components, rank, seed)``.

    The mixture (float64, with exact log-density and posterior mean) is ``self.mixture``; the train,
    val and test sets (the test set as large as the validation set) are independent seeded draws.

    Args:
        dim: dimension of the points.
        components: mixture components.
        rank: rank of each component's low-rank covariance factor.
        n_train: training points.
        n_val: validation points (and test points).
        batch_size: per-process batch size.
        seed: seed of the mixture, the draws and the training order.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).

    Example:
        >>> dm = GaussianMixtureDataModule(dim=2, n_train=100, n_val=20, batch_size=32)
        >>> dm.setup("fit")
        >>> (x,) = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, len(dm.val_set)
        ((32, 2), torch.float32, 20)
    """

    def __init__(
        self,
        dim: int = 2,
        components: int = 8,
        rank: int = 1,
        n_train: int = 4000,
        n_val: int = 1000,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if min(dim, components, rank) < 1 or rank > dim:
            raise ValueError(f"need dim, components >= 1 and 1 <= rank <= dim; got {dim}, {components}, {rank}")
        if n_train < 1 or n_val < 1:
            raise ValueError(f"n_train and n_val must be >= 1, got {n_train} and {n_val}")
        self.save_hyperparameters()
        self.dim, self.n_train, self.n_val = dim, n_train, n_val
        from entreg.diffusion.gmm import GaussianMixture  # the package's __init__ imports diffusers

        self.mixture = GaussianMixture.random(dim, components, rank, seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed + 1)
        points = self.mixture.sample(self.n_train + 2 * self.n_val, generator).float()
        train, val, test = points.split([self.n_train, self.n_val, self.n_val])
        self.train_set, self.val_set, self.test_set = TensorDataset(train), TensorDataset(val), TensorDataset(test)
