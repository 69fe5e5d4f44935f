"""Training batches from streamed sources: encoded on the fly, split across ranks and workers, resumable.

The epoch's mixed record stream (:func:`~lightning_ft.data.streaming.mixed_stream`) is cut into *units* of
consecutive records: one batch (``batch_size`` records) for padded and packed batches, a window of
:data:`GROUP_WINDOW` batches for length-grouped ones (sorted by length inside the window, the batches then
shuffled: the bounded buffer of grouping). Unit ``u`` belongs to rank ``u % world_size``, so ranks never
share an example (the records of an epoch's last incomplete round of units are left out under several
processes, so that all ranks yield as many batches). Within a rank, padded and packed units go round-robin to the DataLoader workers, which
convert and tokenise only their own units; a grouped window is tokenised by every worker, which each keep
their share of its batches. Every batch carries its position (unit, batch in the unit): a resumed run
re-creates the same stream, skips the records of the finished units without converting them, and
continues with the next batch, so it sees the same batches as an uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.data.encode import DROPPED, KEPT, NO_LABELS, encode_batch
from lightning_ft.data.streaming import RawRecord, SourceStream, convert_record, mixed_stream

#: Batches per length-grouping window in a stream (as many as the map-style sampler groups within).
GROUP_WINDOW = 50


@dataclass
class Encoding:
    """What turns conversations into examples: :func:`~lightning_ft.data.encode.encode_batch`'s settings."""

    tokenizer: Any
    chat_template: str | None
    max_length: int
    truncation: str
    labelling: dict[str, Any]
    system_prompt: str | None = None

    def examples(self, streams: Sequence[SourceStream], records: Sequence[RawRecord],
                 replay: Sequence[bool]) -> list[dict[str, Any]]:
        """The kept examples of ``records`` in order (``source`` and ``replay`` marked, dropped ones left out).

        Raises:
            DataError: A bad record (source, row, field).
            ValueError: A conversation with no trained token, or a template that cannot render it.
        """
        converted, origin = [], []
        for number, part, index, record in records:
            stream = streams[number]
            conversation = convert_record(stream.parts[part], part, index, record, stream.source, self.system_prompt)
            if conversation is not None:
                converted.append(conversation)
                origin.append((number, stream.parts[part].location(index, record)[1]))
        if not converted:
            return []
        out = encode_batch({key: [c[key] for c in converted] for key in ("messages", "row", "part")},
                           tokenizer=self.tokenizer, chat_template=self.chat_template, max_length=self.max_length,
                           truncation=self.truncation, labelling=self.labelling)
        examples = []
        for position, (number, where) in enumerate(origin):
            status = out["status"][position]
            if status == KEPT:
                example = {"input_ids": out["input_ids"][position], "labels": out["labels"][position],
                           "source": number}
                if any(replay):
                    example["replay"] = [int(replay[number])]
                examples.append(example)
            elif status != DROPPED:
                kind = "bad conversation" if status == NO_LABELS else "chat template error"
                raise ValueError(f"{where}: {out['error'][position]} ({kind}; a stream stops at the first one)")
        return examples


@dataclass
class StreamPosition:
    """Where a rank stands in an epoch's stream: the unit and the batch within it to continue at."""

    epoch: int = 0
    unit: int = 0
    batch: int = 0


@dataclass
class StreamingBatches(torch.utils.data.IterableDataset):
    """Collated training batches of the streamed sources (``DataLoader(..., batch_size=None)``).

    Args:
        streams: The sources' record streams.
        weights: Mixture weights (``None``: one source read as it is).
        replay: Which streams are replay data.
        encoding: How conversations become examples.
        batch_size: Records drawn per batch.
        collate_fn: Examples -> batch tensors (set before iterating).
        grouped: Group by length within windows of :data:`GROUP_WINDOW` batches.
        seed: Seeds the mixture, the shuffle buffers and the grouped batch order.
        rank: This process's rank, of ``world_size``.
        world_size: Processes that split the stream.
    """

    streams: list[SourceStream]
    weights: list[float] | None
    replay: list[bool]
    encoding: Encoding
    batch_size: int
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None
    grouped: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    #: The epoch the next iteration yields (the loader sets it before every epoch).
    epoch: int = 0
    #: A position to resume at once (from a checkpoint), applied when its epoch comes.
    resume: StreamPosition | None = None

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def unit_size(self) -> int:
        """Records per unit: one batch, or a grouping window."""
        return self.batch_size * (GROUP_WINDOW if self.grouped else 1)

    def units(self, start: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, list[RawRecord]]]:
        """``(unit number, records)`` of this rank's units from ``start``; units ``wanted`` rejects are drawn
        (to keep the stream's order) but not kept, so skipping costs no conversion or tokenisation.

        Unit ``c`` of every rank comes from round ``c`` of the stream (``world_size`` units), and is yielded once
        its round is complete; under several processes an epoch's last, incomplete round is left out, so that
        every rank yields the same number of batches (a rank that ran out first would wait for the others).
        """
        size, world = self.unit_size, self.world_size
        records: list[RawRecord] = []
        unit = 0
        for position, record in enumerate(mixed_stream(self.streams, self.weights, self.seed, self.epoch)):
            unit, place = divmod(position // size, world)
            if place == self.rank and unit >= start and wanted(unit):
                records.append(record)
            if (position + 1) % (size * world) == 0:
                if records:
                    yield unit, records
                records = []
        if records and world == 1:
            yield unit, records

    def unit_batches(self, unit: int, records: list[RawRecord]) -> list[list[dict[str, Any]]]:
        """The batches of one unit: in order, or (grouped) sorted by length and shuffled (seeded by the unit)."""
        examples = self.encoding.examples(self.streams, records, self.replay)
        if self.grouped:
            examples.sort(key=lambda e: -len(e["input_ids"]))
        batches = [examples[i:i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
        if self.grouped:
            random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{unit}").shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.resume if self.resume is not None and self.resume.epoch == self.epoch else StreamPosition()
        first_unit, first_batch = start.unit, start.batch
        if not self.grouped and first_batch:  # a finished one-batch unit: continue with the next
            first_unit, first_batch = first_unit + 1, 0
        mine = (lambda unit: (unit - first_unit) % workers == worker) if not self.grouped else (lambda unit: True)
        sequence = 0  # batches this rank yields from the start position, dealt round-robin to the workers
        for unit, records in self.units(first_unit, mine):
            for number, examples in enumerate(self.unit_batches(unit, records)):
                if unit == first_unit and number < first_batch or not examples:
                    continue
                if not self.grouped or sequence % workers == worker:
                    yield self._batch(examples, unit, number)
                sequence += 1

    def _batch(self, examples: list[dict[str, Any]], unit: int, number: int) -> dict[str, torch.Tensor]:
        batch = self.collate_fn(examples)
        batch["source_ids"] = torch.tensor([e["source"] for e in examples], dtype=torch.long)
        batch["stream_position"] = torch.tensor([self.epoch, unit, number], dtype=torch.long)
        return batch

    def sample(self, records: int) -> list[dict[str, Any]]:
        """The encoded examples of the first ``records`` records of epoch 0 (rank zero's view), for choosing
        the batching mode and reporting; bad data among them raises here, before training."""
        taken: list[RawRecord] = []
        for record in mixed_stream(self.streams, self.weights, self.seed, 0):
            taken.append(record)
            if len(taken) >= records:
                break
        return self.encoding.examples(self.streams, taken, self.replay)


class StreamLoader(torch.utils.data.DataLoader):
    """The DataLoader of :class:`StreamingBatches`: tells the dataset its epoch before every pass (workers get a
    fresh copy each epoch), and is resumable the way Lightning expects (its position is the datamodule's state).

    Args:
        dataset: The streamed batches.
        epoch_of: Returns the epoch about to start (the trainer's ``current_epoch``).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, dataset: StreamingBatches, epoch_of: Callable[[], int], num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers)
        self.epoch_of = epoch_of

    def __iter__(self) -> Any:
        self.dataset.epoch = self.epoch_of()
        return super().__iter__()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
