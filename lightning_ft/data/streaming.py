"""Sources read as streams: records pulled one at a time, shuffled in a seeded buffer, mixed by weight.

:func:`open_stream` opens a :class:`~lightning_ft.data.sources.Source` as ``datasets`` iterables
(``load_dataset(..., streaming=True)`` for local files, globs and Hub ids; ``Dataset.to_iterable_dataset()``
for a saved dataset), so nothing is converted to Arrow on disk or held in memory. :func:`mixed_stream` draws
the records of an epoch from several sources by weight, each through its own seeded shuffle buffer. The
order depends only on the seed and the epoch, so a resumed run re-creates it and skips what was consumed
without converting or tokenising the skipped records.

Bad records are found when they are reached: a stream stops at the first one, naming its source and row (the
line for JSONL), where the map-style path lists every bad record before training starts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.data.formats import DataError, DataProblem, format_location
from lightning_ft.data.sources import (
    _SEP,
    Source,
    SourceError,
    _datasets_cache,
    _is_hub_id,
    _open_file,
    _open_saved,
    _table_format,
    _text_format,
    convert_batch,
    datasets_progress,
    local_parts,
)
from lightning_ft.models import hub_reachable

#: A raw record on its way: ``(source number, part number, index in the part, record)``.
RawRecord = tuple[int, int, int, dict[str, Any]]


@dataclass(frozen=True)
class StreamPart:
    """One file (or split) of a streamed source: how rows are located, and how records are read.

    Attributes:
        label: The file or ``dataset[split]`` errors name.
        unit: ``line`` (JSONL), ``record`` (JSON list) or ``row`` (tables, saved and Hub datasets).
        text: Records are JSON text (``{"text": ...}``) rather than table rows.
        format: The record format, detected from the first records or the columns.
        dataset: The ``datasets.IterableDataset`` of raw records.
    """

    label: str
    unit: str
    text: bool
    format: str
    dataset: Any

    def location(self, index: int, record: dict[str, Any]) -> tuple[int, str]:
        """The row number users find the record at, and its ``file:line`` / ``source:row N`` text."""
        row = record["number"] if "number" in record else (index + 1 if self.text else index)
        return row, format_location(self.label, row, self.unit)


def _stream_file(file: str) -> tuple[Any, str, bool]:
    """``(iterable dataset, unit, holds JSON text)`` of one local file."""
    import datasets

    suffix = Path(file).suffix
    if suffix == ".json":  # one JSON value: parsed whole by the map-style reader, then iterated
        ds, unit, text, problems = _open_file(file)
        if problems:
            raise DataError(problems)
        return ds.to_iterable_dataset(), unit, text
    if suffix == ".arrow":
        return datasets.Dataset.from_file(file).to_iterable_dataset(), "row", False
    builder = "text" if suffix == ".jsonl" else suffix[1:]
    extra = {"encoding": "utf-8-sig"} if suffix == ".jsonl" else {}
    ds = datasets.load_dataset(builder, data_files=[file], split="train", streaming=True,
                               cache_dir=_datasets_cache(), **extra)
    return ds, ("line" if suffix == ".jsonl" else "row"), suffix == ".jsonl"


def _stream_hub(source: Source) -> Any:
    import datasets

    if not hub_reachable():
        raise SourceError(source.label, "cannot stream the Hub dataset: this machine has no network access to "
                                        "huggingface.co (pass a local copy: Parquet, JSONL or a saved dataset)")
    try:
        return datasets.load_dataset(source.path, source.subset, split=source.split or "train",
                                     revision=source.revision, streaming=True)
    except (ConnectionError, OSError, ValueError) as error:
        raise SourceError(source.label, f"cannot stream the Hub dataset: {str(error).splitlines()[0]}")


def _raw_parts(source: Source) -> list[tuple[str, Any, str, bool]]:
    """``(label, iterable dataset, unit, holds JSON text)`` of every part of a source."""
    if _is_hub_id(source.path):
        return [(source.label, _stream_hub(source), "row", False)]
    return [(label, _open_saved(Path(file), source).to_iterable_dataset(), "row", False) if saved
            else (file, *_stream_file(file)) for label, file, saved in local_parts(source)]


def open_stream(source: Source, format: str = "auto") -> list[StreamPart]:
    """Open every part of ``source`` as a stream and detect its record format (reading only the first records).

    Raises:
        DataError: A source that cannot be read, has no detectable format, or lacks a needed column.
    """
    try:
        with datasets_progress():
            raw = _raw_parts(source)
        parts = []
        for label, ds, unit, text in raw:
            if not text and ds.features is None:  # CSV: the column types come from the first rows
                ds = ds._resolve_features()
            resolved = (_text_format(label, ds, source.columns) if format == "auto" else format) if text else \
                _table_format(label, ds, format, source.columns)
            parts.append(StreamPart(label, unit, text, resolved, ds))
    except SourceError as error:
        raise DataError([DataProblem(error.label, None, None, error.message)]) from None
    return parts


def convert_record(part: StreamPart, number: int, index: int, record: dict[str, Any], source: Source,
                   system_prompt: str | None) -> dict[str, Any] | None:
    """One raw record -> ``{"messages", "row", "part"}`` (``None`` for a blank JSONL line), with the map-style
    path's :func:`~lightning_ft.data.sources.convert_batch`.

    Raises:
        DataError: The record is bad; names its source, row (or line) and field.
    """
    out = convert_batch({key: [value] for key, value in record.items()}, [index], text=part.text,
                        format=part.format, system_prompt=system_prompt, columns=source.columns, part=number)
    row, _ = part.location(index, record)
    if out["problems"][0]:
        raise DataError([DataProblem(part.label, row, *(item.split(_SEP, 1)[0] or None, item.split(_SEP, 1)[1]),
                                     part.unit) for item in out["problems"][0]])
    if not out["messages"][0]:
        return None
    return {"messages": out["messages"][0], "row": row, "part": number}


def shuffle_buffer(records: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Records in a seeded random order, holding at most ``size`` of them (``size <= 1``: in order)."""
    if size <= 1:
        yield from records
        return
    buffer: list[Any] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = record
    rng.shuffle(buffer)
    yield from buffer


class SourceStream:
    """One source's records, pass after pass, each pass through a seeded shuffle buffer.

    Args:
        source: The source.
        parts: Its opened parts (:func:`open_stream`).
        number: Its position in the mixture (seeds its shuffle apart from the others').
        buffer: Shuffle buffer size in records.
        seed: Base seed.
    """

    def __init__(self, source: Source, parts: Sequence[StreamPart], number: int, buffer: int, seed: int) -> None:
        self.source, self.parts, self.number, self.buffer, self.seed = source, list(parts), number, buffer, seed

    def records(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """Every raw record of one pass in file order: ``(part number, index in the part, record)``."""
        for number, part in enumerate(self.parts):
            index = 0
            # ``iter`` reads the whole stream in every DataLoader worker (plain iteration would hand each worker
            # some of the files): the workers split the records themselves, after the mixture.
            for batch in part.dataset.iter(batch_size=1000):
                keys = list(batch)
                for position in range(len(batch[keys[0]])):
                    yield number, index, {key: batch[key][position] for key in keys}
                    index += 1

    def one_pass(self, epoch: int, number: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """Pass ``number`` of ``epoch`` in its seeded shuffled order."""
        rng = random.Random(f"{self.seed}/{epoch}/{self.number}/{number}")
        return shuffle_buffer(self.records(), self.buffer, rng)


def mixed_stream(streams: Sequence[SourceStream], weights: Sequence[float] | None, seed: int,
                 epoch: int) -> Iterator[RawRecord]:
    """An epoch of raw records drawn from ``streams`` by ``weights`` (seeded), until every source has been used
    up at least once; a source used up early starts another pass (like ``interleave_datasets`` with
    ``stopping_strategy="all_exhausted"``). One stream without weights is read as it is."""
    passes = [0] * len(streams)
    iterators = [stream.one_pass(epoch, 0) for stream in streams]
    finished = [False] * len(streams)
    rng = random.Random(f"{seed}/{epoch}/mix")
    choices = list(range(len(streams)))
    while True:
        number = rng.choices(choices, weights)[0] if weights is not None and len(streams) > 1 else 0
        item = next(iterators[number], None)
        if item is None:
            finished[number] = True
            if all(finished):
                return
            passes[number] += 1
            iterators[number] = streams[number].one_pass(epoch, passes[number])
            item = next(iterators[number], None)
            if item is None:
                raise DataError([DataProblem(streams[number].source.label, None, None, "no records (it is empty)")])
        yield (number, *item)


def training_streams(sources: Sequence[Source], replay_path: str | None, replay_ratio: float, format: str,
                     buffer: int, seed: int) -> tuple[list[SourceStream], list[float] | None, list[bool]]:
    """The streams of a training mixture, their weights (``None`` for one source read as it is) and which
    are replay: a source without ``weight`` weighs 1; ``replay_ratio`` gives replay that share of the draws."""
    every = list(sources) + ([Source(replay_path, name="replay")] if replay_path is not None else [])
    streams = [SourceStream(source, open_stream(source, format), number, buffer, seed)
               for number, source in enumerate(every)]
    replay = [False] * len(sources) + ([True] if replay_path is not None else [])
    if len(every) == 1:
        return streams, None, replay
    task = [float(source.weight if source.weight is not None else 1.0) for source in sources]
    if replay_path is None:
        return streams, task, replay
    return streams, [w / sum(task) * (1.0 - replay_ratio) for w in task] + [replay_ratio], replay
