"""Training mixtures: how many examples of each source an epoch draws, and the examples as one indexable set.

A source without ``weight`` or ``count`` is used whole every epoch. A source with ``count`` gives exactly
that many examples per epoch. Sources with ``weight`` share as many examples as they hold together, in
proportion to their weights: a source smaller than its share repeats, a larger one is walked through
over epochs. Drawn sources never repeat an example before their whole pool has been seen (see
:class:`~lightning_ft.data.sampling.ResumableSampler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.data.sources import Source


def per_epoch(sources: Sequence[Source], sizes: Sequence[int]) -> list[int | None]:
    """Examples each source contributes per epoch; ``None`` for a source used whole.

    Args:
        sources: The training sources, with their ``weight`` or ``count``.
        sizes: Encoded examples each holds.
    """
    weighted = [(s, n) for s, n in zip(sources, sizes) if s.weight is not None]
    total_weight = sum(s.weight for s, _ in weighted)
    budget = sum(n for _, n in weighted)
    plan: list[int | None] = []
    for source, size in zip(sources, sizes):
        if source.count is not None:
            plan.append(source.count)
        elif source.weight is not None:
            plan.append(max(1, round(budget * source.weight / total_weight)))
        else:
            plan.append(None)
    return plan


class MixtureDataset(torch.utils.data.Dataset):
    """Encoded sources side by side: index ``i`` is an example of the source whose range holds it.

    Items are ``{"input_ids", "labels"}``, plus ``replay`` (``[0]``/``[1]``) when a replay source is present and
    ``source`` (its position) when there are several sources. Rows are read from Arrow on demand.

    Args:
        parts: :class:`ExampleView` of each source.
        replay: Which parts are replay data (their tokens are logged apart by the module).
    """

    def __init__(self, parts: Sequence[Any], replay: Sequence[bool] | None = None) -> None:
        self.parts = list(parts)
        self.replay = list(replay) if replay is not None else [False] * len(self.parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def source_of(self, index: int) -> int:
        """The part that holds ``index``."""
        low, high = 0, len(self.parts) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self.starts[middle] <= index:
                low = middle
            else:
                high = middle - 1
        return low

    def lengths(self) -> list[int]:
        """Token count of every example."""
        return [n for part in self.parts for n in part.lengths()]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        part = self.source_of(index)
        item = self.parts[part][index - self.starts[part]]
        if any(self.replay):
            item["replay"] = [int(self.replay[part])]
        if len(self.parts) > 1:
            item["source"] = part
        return item


@dataclass(frozen=True)
class SourceTaggingCollator:
    """Wraps a collator: the batch also carries ``source_ids``, the source of each example (picklable).

    Args:
        collate_fn: The collator that builds the tensors (it ignores the ``source`` key).
    """

    collate_fn: Any

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate_fn(examples)
        if examples and "source" in examples[0]:
            batch["source_ids"] = torch.tensor([example["source"] for example in examples], dtype=torch.long)
        return batch


class ExampleView(Sequence):
    """The encoded examples of one split as a read-only sequence of ``{"input_ids", "labels"}`` dicts.

    Rows are read from Arrow on access; nothing is held as Python lists. Slicing and ``+`` give lists.

    Args:
        dataset: An encoded dataset with ``input_ids``, ``labels`` and ``length`` columns (or ``None``).
    """

    def __init__(self, dataset: Any = None) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return 0 if self.dataset is None else len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = self.dataset[index]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def lengths(self) -> list[int]:
        """Token count of every example, from the ``length`` column."""
        return [] if self.dataset is None else [int(n) for n in self.dataset["length"]]

    def __add__(self, other: Sequence) -> list:
        return list(self) + list(other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]
