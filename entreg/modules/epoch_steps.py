"""The training data of modules that make their own: RL agents stepping their envs, GRPO sampling its rollouts."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from lightning import LightningModule
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["EpochSteps", "epoch_steps_loader"]


class EpochSteps(IterableDataset):
    """One placeholder item per training step, ``per_epoch`` steps to a Lightning epoch, for a module whose
    ``training_step`` makes its own data (an env step, a PPO rollout, a GRPO iteration).

    Each epoch yields the steps left until its end, counted from ``taken()``, the module's own count of training
    steps (which its checkpoint restores), and ``epoch()``, Lightning's epoch: epoch ``e`` ends after step
    ``(e + 1) * per_epoch``. So a run stopped mid-epoch and resumed ends that epoch where the uninterrupted run does,
    and a run that stopped itself mid-epoch (its total reached, a compute budget spent: Lightning counts that epoch as
    done) and is extended keeps the uninterrupted run's epoch numbers from there on: its next epoch also takes the
    rest of the cut one, and its epoch-end checkpoints and ``max_epochs`` fall on the same steps. (Where ``taken()``
    is already past the epoch's end, as after a resume with a smaller ``per_epoch``, the epoch takes the steps left in
    ``taken()``'s own ``per_epoch`` block.) Iterable, so that under DDP no sampler splits the items over the ranks;
    without ``__len__``, which Lightning warns about on an ``IterableDataset`` and which would be wrong in a resumed
    epoch. So Lightning sees epochs of unknown length: its fractional ``limit_train_batches``/``val_check_interval``
    are refused (the module's own periods, in its steps, are the way to set them) and the progress bar shows no
    total. With ``step`` each item covers that many of the counted units (a PPO rollout: its env steps over all ranks,
    ``taken()`` the env steps done): an epoch ends at the first item that reaches its end, so the ends stay at the
    same counts if ``step`` changes at a resume (another number of ranks).

    Example:
        >>> list(EpochSteps(4, taken=lambda: 0, epoch=lambda: 0))  # a fresh run: a whole epoch
        [0, 1, 2, 3]
        >>> list(EpochSteps(4, taken=lambda: 6, epoch=lambda: 1))  # resumed after 6 steps: the last 2 of epoch 1
        [0, 1]
        >>> len(list(EpochSteps(4, taken=lambda: 6, epoch=lambda: 2)))  # stopped itself at 6, extended: to step 12
        6
        >>> len(list(EpochSteps(300, taken=lambda: 256, epoch=lambda: 0, step=lambda: 128)))  # rollouts to 384 >= 300
        1
    """

    def __init__(
        self, per_epoch: int, taken: Callable[[], int], epoch: Callable[[], int], step: Callable[[], int] = lambda: 1
    ) -> None:
        if per_epoch < 1:
            raise ValueError(f"per_epoch must be >= 1 training step, got {per_epoch}")
        self.per_epoch, self.taken, self.epoch, self.step = per_epoch, taken, epoch, step

    def __iter__(self) -> Iterator[int]:
        taken, end = self.taken(), (self.epoch() + 1) * self.per_epoch
        left = end - taken if end > taken else self.per_epoch - taken % self.per_epoch
        return iter(range(-(-left // self.step())))  # whole items: the last one reaches the end


def epoch_steps_loader(
    module: LightningModule, per_epoch: int, taken: Callable[[], int], step: Callable[[], int] = lambda: 1
) -> DataLoader:
    """A ``DataLoader`` of :class:`EpochSteps` items for ``module``'s fit (epochs from its trainer), one at a time
    (what ``train_dataloader`` returns)."""
    return DataLoader(EpochSteps(per_epoch, taken, lambda: module.trainer.current_epoch, step), batch_size=None)
