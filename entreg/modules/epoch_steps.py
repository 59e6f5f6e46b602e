"""The training data of modules that make their own: RL agents stepping their envs, GRPO sampling its rollouts."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset

__all__ = ["EpochSteps", "epoch_steps_loader"]


class EpochSteps(IterableDataset):
    """One placeholder item per training step, ``per_epoch`` steps to a Lightning epoch, for a module whose
    ``training_step`` makes its own data (an env step, a PPO rollout, a GRPO iteration).

    Each epoch yields the steps left in it, counted from ``taken()``, the module's own count of training steps (which
    its checkpoint restores): a run stopped mid-epoch and resumed ends that epoch where the uninterrupted run does,
    and its later epochs (and epoch-end checkpoints) fall on the same steps. Iterable, so that under DDP no sampler
    splits the items over the ranks; without ``__len__``, which Lightning warns about on an ``IterableDataset`` and
    which would be wrong in a resumed epoch. So Lightning sees epochs of unknown length: its fractional
    ``limit_train_batches``/``val_check_interval`` are refused (the module's own periods, in its steps, are the way to
    set them) and the progress bar shows no total.

    Example:
        >>> list(EpochSteps(4, taken=lambda: 0))  # a fresh run: a whole epoch
        [0, 1, 2, 3]
        >>> list(EpochSteps(4, taken=lambda: 6))  # resumed after 6 steps: the last 2 of the second epoch
        [0, 1]
    """

    def __init__(self, per_epoch: int, taken: Callable[[], int]) -> None:
        if per_epoch < 1:
            raise ValueError(f"per_epoch must be >= 1 training step, got {per_epoch}")
        self.per_epoch, self.taken = per_epoch, taken

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.per_epoch - self.taken() % self.per_epoch))


def epoch_steps_loader(per_epoch: int, taken: Callable[[], int]) -> DataLoader:
    """A ``DataLoader`` of :class:`EpochSteps` items, one at a time (what ``train_dataloader`` returns)."""
    return DataLoader(EpochSteps(per_epoch, taken), batch_size=None)
