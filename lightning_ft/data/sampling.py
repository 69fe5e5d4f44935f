"""A shuffling sampler that resumes mid-epoch exactly where a checkpoint left off."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Seeded order per epoch (``seed + epoch``), and an optional number of samples to skip once.

    ``__len__`` stays the full epoch length while a resumed epoch yields only what is left, so
    Lightning's batch counter (restored from the checkpoint) ends the epoch at the right batch.

    Pools (mixture sources and replay): after the ``size`` examples used every epoch come pools of which
    each epoch draws a fixed number (a different seeded draw every epoch, without repeats until the pool
    is used up, more than the pool's size repeating it), shuffled in among the others. ``replay_size``
    and ``replay_per_epoch`` are the one-pool shorthand.

    Args:
        size: Number of examples used whole every epoch (indexed first).
        seed: Base seed of the shuffle.
        shuffle: ``False`` keeps index order (then drawn examples follow the whole ones).
        replay_size: Examples in the replay pool, indexed after the ``size`` examples.
        replay_per_epoch: Replay examples mixed into every epoch.
        pools: ``(pool size, drawn per epoch)`` of further pools, indexed after the replay pool.
        lengths: Token count of every example (task, then replay): batches of similar length are formed
            within windows of 50 batches and then shuffled, so less of each batch is padding.
        batch_size: Examples per batch, for ``lengths``.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, replay_size: int = 0,
                 replay_per_epoch: int = 0, lengths: list[int] | None = None, batch_size: int = 1,
                 pools: list[tuple[int, int]] | None = None) -> None:
        if replay_per_epoch and not replay_size:
            raise ValueError(f"replay_per_epoch={replay_per_epoch} needs a non-empty replay pool")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.pools = ([(replay_size, replay_per_epoch)] if replay_per_epoch else []) + [
            (pool, drawn) for pool, drawn in (pools or []) if drawn]
        if any(pool < 1 for pool, _ in self.pools):
            raise ValueError(f"pools={self.pools}: a pool that is drawn from must not be empty")
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
        """The pool indices drawn for ``epoch``: consecutive epochs walk one seeded permutation of each
        pool (reshuffled each time it is used up), so every pooled example is seen before any repeats."""
        drawn, offset = [], self.size
        for number, (pool, per_epoch) in enumerate(self.pools):
            start = epoch * per_epoch
            cycles: dict[int, list[int]] = {}  # one seeded permutation of the pool per pass over it
            for position in range(start, start + per_epoch):
                cycle, index = divmod(position, pool)
                if cycle not in cycles:
                    # The first pool keeps the seeds replay always had; later pools get their own.
                    generator = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle + number * 7_919_993)
                    cycles[cycle] = torch.randperm(pool, generator=generator).tolist()
                drawn.append(offset + cycles[cycle][index])
            offset += pool
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
        return self.size + sum(per_epoch for _, per_epoch in self.pools)


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (its position comes from the restored loop progress)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
