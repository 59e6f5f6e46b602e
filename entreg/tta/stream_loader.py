"""Dataloaders of a protocol's segments, split across DDP ranks without duplicates or drops.

A segment's samples are cut into global batches of ``batch_size`` in stream order; rank ``r`` of ``w`` gets samples
``r, r + w, ...`` of each global batch, so the union of the ranks' k-th batches is global batch k (what one
process with the whole batch sees) and every sample is read once. Every rank gets the same number of batches (the
TTA methods hold collectives in every step): a last global batch with fewer samples than ranks joins the one
before. Lightning keeps these loaders as they are (their sampler is a ``DistributedSampler``: the split is done).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset, default_collate

from entreg.tta.protocols import Segment

__all__ = ["RankBatches", "global_batches", "segment_loader"]


def global_batches(size: int, batch_size: int, world_size: int = 1) -> list[range]:
    """Positions ``0 .. size - 1`` in consecutive batches of ``batch_size``; a last batch with fewer than
    ``world_size`` samples joins the one before.

    Example:
        >>> global_batches(10, 4), global_batches(9, 4, world_size=2)
        ([range(0, 4), range(4, 8), range(8, 10)], [range(0, 4), range(4, 9)])
    """
    if batch_size < world_size:
        raise ValueError(
            f"a global batch of {batch_size} cannot give each of {world_size} processes a sample: use a batch size "
            f">= {world_size} (batch size 1 runs in one process)"
        )
    batches = [range(start, min(start + batch_size, size)) for start in range(0, size, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < world_size:
        batches[-2:] = [range(batches[-2].start, size)]
    return batches


class RankBatches(Dataset):
    """Item ``k``: this rank's share of global batch ``k`` of ``segment``, collated (``default_collate``; a
    TensorDataset is indexed with one index tensor)."""

    def __init__(self, segment: Segment, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset, self.indices = segment.dataset, segment.indices
        self.batches = global_batches(len(segment), segment.batch_size, world_size)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def positions(self, k: int) -> range:
        """The stream positions of this rank's samples in batch ``k``."""
        batch = self.batches[k]
        return range(batch.start + self.rank, batch.stop, self.world_size)

    def __getitem__(self, k: int) -> Any:
        index = self.indices[torch.as_tensor(self.positions(k), dtype=torch.long)]
        if isinstance(self.dataset, TensorDataset):
            return [t[index] for t in self.dataset.tensors]
        return default_collate(fetch(self.dataset, index.tolist()))


def fetch(dataset: Dataset, indices: Sequence[int]) -> list[Any]:
    """The items ``indices`` of ``dataset`` (through ``__getitems__`` where the dataset has it)."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(list(indices))
    return [dataset[i] for i in indices]


class _InOrder(DistributedSampler):
    """Batches ``0 .. n - 1`` in order: a ``DistributedSampler`` only so that Lightning does not put its own in
    (the batches are this rank's already)."""

    def __init__(self, count: int) -> None:
        super().__init__(range(count), num_replicas=1, rank=0, shuffle=False)
        self.count = count

    def __iter__(self):
        return iter(range(self.count))

    def __len__(self) -> int:
        return self.count


def segment_loader(
    segment: Segment,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    **ignored: Any,
) -> DataLoader:
    """The dataloader of ``segment`` for rank ``rank`` of ``world_size`` (see the module docstring). Workers load
    whole batches; the loader draws no number from the global random generator (its own generator seeds the
    workers), so a method that does (DeYO's patch shuffle) sees the same numbers as in a plain loop.
    ``ignored``: other loader options (e.g. a stream's ``batch_size``: the segment's is the global one).

    Example:
        >>> from entreg.tta.protocols import Segment
        >>> data = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> segment = Segment("s", data, torch.arange(10), batch_size=4)
        >>> [y.tolist() for _, y in segment_loader(segment, rank=1, world_size=2)]
        [[1, 3], [5, 7], [9]]
    """
    batches = RankBatches(segment, rank, world_size)
    return DataLoader(
        batches,
        batch_size=None,
        sampler=_InOrder(len(batches)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def batch_targets(batch: Any) -> Tensor | None:
    """The labels of an ``(inputs, labels, ...)`` batch, else None."""
    return batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
