"""The part every entreg DataModule shares: three datasets and their loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

__all__ = ["EpochShuffleSampler", "ResumableDataLoader", "SplitDataModule"]


class EpochShuffleSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so a fit resumed from a checkpoint reads
    the same batches as an uninterrupted one (a plain shuffled DataLoader draws its order from the
    global RNG, which checkpoints do not restore). ``done``, if given, is asked when an epoch's
    iteration begins how many of its samples were already trained on (a fit resumed from a checkpoint
    written in the middle of the epoch): those are skipped, so the rest of the epoch is the same
    as uninterrupted. Being a ``RandomSampler``, it is replaced by Lightning's seeded
    ``DistributedSampler`` under DDP (Lightning then warns that a mid-epoch resume restarts the
    epoch's order). Randomness inside DataLoader workers (augmentations with ``num_workers > 0``) is
    seeded by Lightning, not by this sampler.

    Example:
        >>> sampler = EpochShuffleSampler(range(5), seed=0)
        >>> sampler.set_epoch(3)
        >>> first = list(sampler)
        >>> sampler.set_epoch(3)
        >>> list(sampler) == first
        True
    """

    def __init__(self, data_source: Dataset, seed: int = 0, done: Callable[[], int] | None = None) -> None:
        super().__init__(data_source)
        self.seed, self.epoch, self.done = seed, 0, done

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # seeded when iteration begins (lazily, at the first batch), so nothing drawn between
        # ``iter()`` and ``set_epoch`` can shift the order
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = super().__iter__()
        for _ in range(self.done() if self.done is not None else 0):
            next(order, None)
        yield from order


class ResumableDataLoader(DataLoader):
    """A single-process, single-rank DataLoader over an :class:`EpochShuffleSampler` that skips what a mid-epoch
    checkpoint already trained on. Its state is empty (the sampler asks the fit loop where it resumes), but having
    one tells Lightning that the loader resumes exactly (Lightning warns otherwise)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class SplitDataModule(L.LightningDataModule):
    """A DataModule whose ``setup`` fills ``train_set``, ``val_set`` and ``test_set``.

    The training order is shuffled by ``(seed, epoch)`` (:class:`EpochShuffleSampler`), so resumed
    fits continue exactly. Predict uses the test set. Subclasses set ``num_classes`` and ``channels`` so that model
    configs can read them (``${data.num_classes}``).
    """

    num_classes: int
    channels: int

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _samples_done(self) -> int:
        """Samples of the current training epoch already trained on: nonzero only when a fit resumes from a
        checkpoint written in the middle of an epoch (e.g. by :class:`entreg.callbacks.InterruptCheckpoint`)."""
        if self.trainer is None or not self.trainer.training:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed * self.batch_size

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        distributed = self.trainer is not None and self.trainer.world_size > 1  # DDP replaces the sampler
        if shuffle and self.num_workers == 0 and not distributed:
            sampler = EpochShuffleSampler(dataset, self.seed, self._samples_done)
            loader_class: type[DataLoader] = ResumableDataLoader
        else:  # workers draw their indices before the loop knows where it resumes: no skipping (Lightning warns)
            sampler = EpochShuffleSampler(dataset, self.seed) if shuffle else None
            loader_class = DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
