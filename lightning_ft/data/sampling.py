"""A shuffling sampler that resumes mid-epoch exactly where a checkpoint left off."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Seeded order per epoch (``seed + epoch``), and an optional number of samples to skip once.

    ``__len__`` stays the full epoch length while a resumed epoch yields only what is left, so
    Lightning's batch counter (restored from the checkpoint) ends the epoch at the right batch.

    Args:
        size: Number of examples.
        seed: Base seed of the shuffle.
        shuffle: ``False`` keeps file order.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Skip the first ``skip`` samples of ``epoch`` (the batches a checkpoint had already trained on)."""
        self._resume = (epoch, skip) if skip > 0 else None

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1]:]
            self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (its position comes from the restored loop progress)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
