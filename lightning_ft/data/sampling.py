"""A shuffling sampler that resumes mid-epoch exactly where a checkpoint left off."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Seeded order per epoch (``seed + epoch``), and an optional number of samples to skip once.

    ``__len__`` stays the full epoch length while a resumed epoch yields only what is left, so
    Lightning's batch counter (restored from the checkpoint) ends the epoch at the right batch.

    Replay: indices ``size .. size + replay_size - 1`` are a pool of general data of which each epoch
    draws ``replay_per_epoch`` (a different seeded draw every epoch, without repeats until the pool is
    used up), shuffled in among the ``size`` task examples.

    Args:
        size: Number of (task) examples, all used every epoch.
        seed: Base seed of the shuffle.
        shuffle: ``False`` keeps file order (then replay examples follow the task examples).
        replay_size: Examples in the replay pool, indexed after the task examples.
        replay_per_epoch: Replay examples mixed into every epoch.
        lengths: Token count of every example (task, then replay): batches of similar length are formed
            within windows of 50 batches and then shuffled, so less of each batch is padding.
        batch_size: Examples per batch, for ``lengths``.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, replay_size: int = 0,
                 replay_per_epoch: int = 0, lengths: list[int] | None = None, batch_size: int = 1) -> None:
        if replay_per_epoch and not replay_size:
            raise ValueError(f"replay_per_epoch={replay_per_epoch} needs a non-empty replay pool")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.replay_size, self.replay_per_epoch = replay_size, replay_per_epoch
        self.lengths, self.batch_size = lengths, batch_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Skip the first ``skip`` samples of ``epoch`` (the batches a checkpoint had already trained on)."""
        self._resume = (epoch, skip) if skip > 0 else None

    def replay_indices(self, epoch: int) -> list[int]:
        """The replay pool indices drawn for ``epoch``: consecutive epochs walk one seeded permutation of
        the pool (reshuffled each time it is used up), so every replay example is seen before any repeats."""
        if not self.replay_per_epoch:
            return []
        start = epoch * self.replay_per_epoch
        cycles: dict[int, list[int]] = {}  # one seeded permutation of the pool per pass over it
        drawn = []
        for position in range(start, start + self.replay_per_epoch):
            cycle, offset = divmod(position, self.replay_size)
            if cycle not in cycles:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
                cycles[cycle] = torch.randperm(self.replay_size, generator=generator).tolist()
            drawn.append(self.size + cycles[cycle][offset])
        return drawn

    def order(self, epoch: int) -> list[int]:
        indices = list(range(self.size)) + self.replay_indices(epoch)
        if not self.shuffle:
            return indices
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        return order if self.lengths is None else self._grouped(order, generator)

    def _grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        window = self.batch_size * 50
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1]:]
            self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.size + self.replay_per_epoch


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (its position comes from the restored loop progress)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
