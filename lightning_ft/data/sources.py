"""Where chat data comes from: local files and globs, saved datasets, the Hugging Face Hub, as Arrow datasets.

A :class:`Source` names one place; :func:`read_source` turns it into an Arrow dataset of checked
conversations (a ``messages`` column of ``{role, content}`` and the ``row`` each came from) plus one
:class:`~lightning_ft.data.formats.DataProblem` per bad record, located as users find it again: the line of
a JSONL file, the record of a JSON list, the row index (``dataset[row]``) of a Parquet, CSV or Arrow
file, a saved dataset or a Hub split. Records are any of the four formats (auto-detected), after an
optional column mapping. Reading goes through ``datasets`` (Arrow, memory-mapped, cached under
``$LIGHTNING_FT_CACHE/datasets``); nothing is written next to the user's files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc

from lightning_ft.data.formats import (
    REQUIRED_FIELDS,
    Conversation,
    DataError,
    DataProblem,
    Message,
    convert_record,
    detect_format,
    format_location,
    load_records,
)
from lightning_ft.data.pages import Releasing
from lightning_ft.models import cache_dir, hub_reachable

#: File types read as one record per line, one JSON list, or a table.
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
#: Below this many rows, worker processes cost more than they save.
_PARALLEL_FROM = 2000
_SEP = "\x1f"  # joins a problem's field and text inside one Arrow string


@dataclass
class Source:
    """One place to read conversations from, and its share of a training mixture.

    Args:
        path: A ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file, a glob of them
            (``data/*.parquet``), a directory written by ``Dataset.save_to_disk``, or a Hugging Face Hub
            dataset id (``org/name``; needs a network).
        weight: Share of each training epoch drawn from this source, relative to the other sources' weights
            (a source smaller than its share is repeated, a larger one walked through over epochs).
        count: Exactly this many examples of this source per epoch (instead of ``weight``).
        name: Name in logs (``train/source_share/<name>``); default: the file or dataset name.
        subset: Hub dataset configuration (subset) name.
        split: Split of a Hub dataset or of a saved ``DatasetDict``; default ``train``.
        revision: Hub dataset revision (branch, tag or commit).
        columns: Renames columns (or JSON keys) onto the standard ones before the format is detected,
            e.g. ``{"conversation": "messages"}`` or ``{"question": "instruction", "response": "output"}``.
    """

    path: str
    weight: float | None = None
    count: int | None = None
    name: str | None = None
    subset: str | None = None
    split: str | None = None
    revision: str | None = None
    columns: dict[str, str] | None = None

    @property
    def label(self) -> str:
        """How errors name the source: the path, and the split of a Hub or saved dataset."""
        return f"{self.path}[{self.split}]" if self.split else self.path

    def display_name(self) -> str:
        """``name``, or the file stem / dataset name."""
        return self.name or Path(self.path.rstrip("/")).name.split(".")[0] or self.path

    def problems(self) -> list[str]:
        """Every invalid field, as ``source.field=value: what is allowed``."""
        found = []
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            found.append(f"path={self.path!r}: must be a file, glob, saved dataset directory or Hub id")
        if self.weight is not None and self.count is not None:
            found.append(f"{self.path}: set weight or count, not both")
        if self.weight is not None and not (isinstance(self.weight, (int, float)) and self.weight > 0):
            found.append(f"{self.path}: weight={self.weight!r} must be a number > 0")
        if self.count is not None and not (isinstance(self.count, int) and self.count >= 1):
            found.append(f"{self.path}: count={self.count!r} must be an integer >= 1")
        if self.columns is not None and not (isinstance(self.columns, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items())):
            found.append(f"{self.path}: columns={self.columns!r} must map column names to standard names")
        return found


def as_source(spec: str | os.PathLike | Source) -> Source:
    """A :class:`Source` from a path string (or a Source, returned as is)."""
    return spec if isinstance(spec, Source) else Source(str(spec))


@dataclass
class SourceData:
    """A source read into Arrow: checked conversations in ``dataset`` (``messages``, ``row``), bad ones in problems."""

    source: Source
    dataset: Any
    problems: list[DataProblem]
    units: list[tuple[str, str]]  # (label, unit) of each part; rows carry their part number

    def location(self, part: int, row: int) -> str:
        """``file:line``, ``file:record N`` or ``source:row N`` of a record."""
        label, unit = self.units[part]
        return format_location(label, row, unit)

    def conversations(self, dataset: Any = None) -> list[Conversation]:
        """The conversations of ``dataset`` (default: all) as Python objects, for the checks; training stays
        in Arrow."""
        dataset = self.dataset if dataset is None else dataset
        if dataset is None:
            return []
        return [Conversation(tuple(Message(**{k: v for k, v in m.items() if v is not None})  # type: ignore[typeddict-item]
                                   for m in record["messages"]),
                             self.location(record["part"], record["row"])) for record in dataset]


# -- opening a source as raw Arrow data ---------------------------------------------------------------
def _datasets_cache() -> str:
    return str(cache_dir() / "datasets")


def _is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return (not os.path.exists(path) and len(parts) == 2 and all(parts) and not path.startswith((".", "~"))
            and not Path(path).suffix and not any(c in path for c in "*?["))


def _open_hub(source: Source) -> Any:
    import datasets

    split = source.split or "train"
    if not hub_reachable():
        raise SourceError(source.label, "cannot load the Hub dataset: this machine has no network access to "
                                        "huggingface.co (save it with `Dataset.save_to_disk` on a connected machine "
                                        "and pass that directory, or a Parquet/JSONL copy)")
    try:
        with datasets_progress():
            return datasets.load_dataset(source.path, source.subset, split=split, revision=source.revision,
                                         cache_dir=_datasets_cache())
    except (ConnectionError, OSError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        why = "offline mode is set" if offline else "the machine has no network access to huggingface.co"
        raise SourceError(source.label, f"cannot load the Hub dataset ({why}: {str(error).splitlines()[0]}); "
                          "save it with `Dataset.save_to_disk` on a connected machine and pass that directory")
    except ValueError as error:  # an unknown split, subset or revision
        raise SourceError(source.label, str(error).splitlines()[0])


def _open_saved(path: Path, source: Source) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or "train"
        if split not in loaded:
            raise SourceError(source.path, f"the saved dataset has no split {split!r} "
                              f"(splits: {', '.join(loaded)}); set split")
        return loaded[split]
    return loaded


#: Rows from which a ``datasets`` stage (reading, tokenising) shows its progress bar: below it a stage takes
#: a few seconds at most, and its bar would be noise in the run's output.
PROGRESS_FROM = 5000


@contextlib.contextmanager
def datasets_progress(rows: int | None = None) -> Iterator[None]:
    """Hide ``datasets`` progress bars for a stage over ``rows`` rows (``None``: reading a file, which takes
    seconds even for large ones) when it is short; restore the global setting afterwards."""
    import datasets

    was_enabled = not datasets.utils.are_progress_bars_disabled()
    if rows is None or rows < PROGRESS_FROM:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unsupported, unreachable, empty); one line naming it."""

    def __init__(self, label: str, message: str) -> None:
        self.label, self.message = label, message
        super().__init__(f"{label}: {message}")


def _open_file(file: str) -> tuple[Any, Literal["line", "record", "row"], bool, list[DataProblem]]:
    """``(dataset, unit, holds JSON text, problems)`` for one local file."""
    import datasets

    suffix = Path(file).suffix
    if suffix == ".jsonl":
        try:
            with datasets_progress():
                ds = datasets.load_dataset("text", data_files=[file], split="train", encoding="utf-8-sig",
                                           cache_dir=_datasets_cache())
        except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError):
            return None, "line", True, load_records(file)[2]  # the error path names the byte (or the cause)
        return ds, "line", True, []
    if suffix == ".json":  # one JSON list: parsed whole (it is one value), then kept as JSON text per record
        records, unit, problems = load_records(file)
        ds = datasets.Dataset.from_dict({"text": [json.dumps(r, ensure_ascii=False) for _, r in records],
                                         "number": [n for n, _ in records]})
        return ds, unit, True, problems
    if suffix == ".arrow":
        return datasets.Dataset.from_file(file), "row", False, []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(file).metadata.num_rows == 0:
            return None, "row", False, [DataProblem(file, None, None, "no records (it is empty)")]
    try:
        with datasets_progress():
            ds = datasets.load_dataset(suffix[1:], data_files=[file], split="train", cache_dir=_datasets_cache())
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__ or error
        return None, "row", False, [DataProblem(file, None, None, f"cannot be read as {suffix[1:].upper()}: "
                                                                  f"{str(cause).splitlines()[0]}")]
    return ds, "row", False, []


def _expand(path: str) -> list[str]:
    pattern = str(Path(path).expanduser())
    if any(c in pattern for c in "*?["):
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise SourceError(path, "no file matches this pattern")
        return files
    return [pattern]


def local_parts(source: Source) -> list[tuple[str, str, bool]]:
    """``(label, path, is a saved dataset)`` of every local file or saved dataset of a source, checked to be one.

    Raises:
        SourceError: A missing file, an unsupported file type, or a directory no ``save_to_disk`` wrote.
    """
    parts = []
    for file in _expand(source.path):
        path = Path(file)
        if path.is_dir():
            if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
                raise SourceError(file, "is a directory but not one written by Dataset.save_to_disk")
            parts.append((f"{file}[{source.split}]" if source.split else file, file, True))
        elif not path.is_file():
            raise SourceError(file, "file not found")
        elif path.suffix not in SUFFIXES:
            raise SourceError(file, f"unsupported file type {path.suffix!r} (allowed: {', '.join(SUFFIXES)}, "
                              "a saved dataset directory, or a Hub id)")
        else:
            parts.append((file, file, False))
    return parts


def _open(source: Source) -> list[tuple[str, Any, str, bool, list[DataProblem]]]:
    """Every part of a source as ``(label, dataset, unit, holds JSON text, problems)``."""
    if _is_hub_id(source.path):
        return [(source.label, _open_hub(source), "row", False, [])]
    return [(label, _open_saved(Path(file), source), "row", False, []) if saved else (file, *_open_file(file))
            for label, file, saved in local_parts(source)]


# -- records -> conversations -------------------------------------------------------------------------
def _renamed(record: Any, columns: dict[str, str] | None) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(key, key): value for key, value in record.items()}


def _decode_cell(record: dict[str, Any], format: str) -> list[tuple[str | None, str]]:
    """Message lists stored as JSON text (the way CSV holds them) are parsed in place; problems come back."""
    for key in ("messages", "conversations", "prompt", "completion"):
        value = record.get(key)
        if key in REQUIRED_FIELDS[format] and isinstance(value, str) and value.lstrip()[:1] == "[" \
                and key not in ("prompt", "completion"):
            try:
                record[key] = json.loads(value)
            except json.JSONDecodeError as error:
                return [(key, f"invalid JSON in the column: {error.msg} (column {error.colno})")]
    return []


def convert_batch(batch: dict[str, list], indices: list[int], *, text: bool, format: str,
                  system_prompt: str | None, columns: dict[str, str] | None, part: int = 0) -> dict[str, list]:
    """``datasets.map`` function: raw records (JSON text or table rows) -> ``messages``, ``problems``, ``row``.

    A blank JSONL line yields neither messages nor problems; a bad record yields problems
    (``field<US>text``) and no messages.
    """
    keys = list(batch)
    numbers = batch.get("number")
    out: dict[str, list] = {"messages": [], "problems": [], "row": [], "part": [part] * len(indices)}
    for position, index in enumerate(indices):
        row = numbers[position] if numbers is not None else (index + 1 if text else index)
        messages, issues = [], []
        if text:
            line = batch["text"][position]
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    issues = [(None, f"invalid JSON: {error.msg} (column {error.colno})")]
                except RecursionError:
                    issues = [(None, "invalid record: JSON nested too deeply")]
                else:
                    messages, issues = convert_record(_renamed(record, columns), format, system_prompt)
        else:
            record = _renamed({key: batch[key][position] for key in keys}, columns)
            issues = _decode_cell(record, format)
            if not issues:
                messages, issues = convert_record(record, format, system_prompt)
        if messages:
            messages, issues = _unicode_checked(messages)
        out["messages"].append(messages)
        out["problems"].append([f"{field or ''}{_SEP}{message}" for field, message in issues])
        out["row"].append(row)
    return out


def _unicode_checked(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str | None, str]]]:
    """The messages, or a problem for text that is not valid Unicode (a lone surrogate from JSON ``\\ud800``)."""
    for index, message in enumerate(messages):
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as error:
            return [], [(f"messages[{index}].content", f"not valid Unicode text ({error.reason} at character "
                                                       f"{error.start})")]
    return messages, []


def _features() -> Any:
    from datasets import Features, List, Value

    return Features({"messages": List({"role": Value("string"), "content": Value("string"), "train": Value("bool")}),
                     "problems": List(Value("string")), "row": Value("int64"), "part": Value("int32")})


def _text_format(label: str, ds: Any, columns: dict[str, str] | None) -> str:
    """The format of the first JSON record whose keys match one (read until found)."""
    first_keys = None
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        for line in batch["text"]:
            try:
                record = _renamed(json.loads(line), columns) if line.strip() else None
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(record, dict):
                first_keys = first_keys if first_keys is not None else list(record)
                if (found := detect_format(record)) is not None:
                    return found
    raise SourceError(label, _undetectable(first_keys))


def _undetectable(keys: list[str] | None) -> str:
    needs = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in REQUIRED_FIELDS.items())
    return (f"cannot detect the record format: no record has the fields of one (first record's fields: "
            f"{', '.join(keys) if keys else 'none'}; formats need {needs}; map other names with `columns`)")


_TEXT_ONLY = {"instruction", "input", "output", "system"}


def _table_format(label: str, ds: Any, format: str, columns: dict[str, str] | None) -> str:
    """The format from the column names, after checking every needed column's Arrow type (one line each)."""
    from datasets import LargeList, List, Value

    names = {(columns or {}).get(name, name): name for name in ds.column_names}
    missing = [key for key in (columns or {}) if key not in ds.column_names]
    if missing:
        raise SourceError(label, f"columns maps {missing[0]!r}, but there is no such column "
                                 f"(columns: {', '.join(ds.column_names)})")
    resolved = detect_format(names) if format == "auto" else format
    if resolved is None:
        raise SourceError(label, _undetectable(ds.column_names))
    absent = [key for key in REQUIRED_FIELDS[resolved] if key not in names]
    if absent:
        raise SourceError(label, f"missing column {absent[0]!r} ({resolved} format; columns: "
                                 f"{', '.join(ds.column_names)})")
    for key in (*REQUIRED_FIELDS[resolved], *(_TEXT_ONLY & set(names))):
        feature = ds.features[names[key]]
        is_text = isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")
        is_list = isinstance(feature, (List, LargeList))
        allowed = is_text if key in _TEXT_ONLY else (is_text or is_list)
        if not allowed:
            kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
            expected = "text" if key in _TEXT_ONLY else "a list of messages (or JSON text of one)"
            raise SourceError(label, f"column {names[key]!r} holds {kind} values, expected {expected}")
    return resolved


def _map(ds: Any, function: Any, num_proc: int | None, description: str, **kwargs: Any) -> Any:
    procs = num_proc if num_proc and num_proc > 1 and len(ds) >= _PARALLEL_FROM else None
    with datasets_progress(len(ds)):
        return ds.map(Releasing(function, ds), batched=True, batch_size=1000, num_proc=procs, desc=description,
                      **kwargs)


def _problems(label: str, unit: str, converted: Any) -> tuple[list[DataProblem], np.ndarray]:
    """Every problem of a converted part, and the indices of its good rows."""
    table = converted.data
    bad = np.flatnonzero(pc.list_value_length(table.column("problems")).to_numpy(zero_copy_only=False) > 0)
    good = np.flatnonzero(pc.list_value_length(table.column("messages")).to_numpy(zero_copy_only=False) > 0)
    problems = []
    for record in converted.select(bad).select_columns(["problems", "row"]):
        for item in record["problems"]:
            field, message = item.split(_SEP, 1)
            problems.append(DataProblem(label, record["row"], field or None, message, unit))
    return problems, good


def read_source(spec: str | os.PathLike | Source, format: str = "auto", system_prompt: str | None = None,
                num_proc: int | None = None) -> SourceData:
    """Read a source into checked conversations in Arrow; never raises on bad data.

    Args:
        spec: A :class:`Source` or a path string.
        format: A record format or ``auto`` (per file: from the first matching record, or the column names).
        system_prompt: Inserted as the first message of every conversation that has none.
        num_proc: Worker processes for the conversion of large sources.

    Returns:
        The good conversations (``messages``, ``row``) and every problem: one per bad record field, or one
        for a source that cannot be read at all.
    """
    import datasets

    source = as_source(spec)
    parts, problems, units = [], [], []
    try:
        opened = _open(source)
    except SourceError as error:
        return SourceData(source, None, [DataProblem(error.label, None, None, error.message)], [])
    for label, ds, unit, text, found in opened:
        problems += found
        if ds is None or len(ds) == 0:
            problems += [] if found or ds is None else [DataProblem(label, None, None, "no records (it is empty)")]
            continue
        try:
            resolved = _text_format(label, ds, source.columns) if text and format == "auto" else (
                format if text else _table_format(label, ds, format, source.columns))
        except SourceError as error:
            problems.append(DataProblem(error.label, None, None, error.message))
            continue
        converted = _map(ds, convert_batch, num_proc, f"Reading {Path(label).name}", with_indices=True,
                         remove_columns=ds.column_names, features=_features(),
                         fn_kwargs={"text": text, "format": resolved, "system_prompt": system_prompt,
                                    "columns": source.columns, "part": len(parts)})
        found, good = _problems(label, unit, converted)
        problems += found
        if not len(good) and not found:
            problems.append(DataProblem(label, None, None, "no records (it is empty)"))
        kept = converted.select(good).remove_columns(["problems"])
        parts.append(kept)
        units.append((label, unit))
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else (parts[0] if parts else None)
    problems.sort(key=lambda p: (p.path, p.line or 0))
    return SourceData(source, dataset, problems, units)


def read_conversations_from(spec: str | os.PathLike | Source, format: str = "auto",
                            system_prompt: str | None = None) -> list[Conversation]:
    """Every conversation of a (small) source as Python objects, for evaluation sets and prompt lists.

    Raises:
        DataError: Every bad record, with source, line or row, and field.
    """
    data = read_source(spec, format, system_prompt)
    if data.problems:
        raise DataError(data.problems)
    return data.conversations()


# -- raw records, for record shapes other than chat conversations --------------------------------------
@dataclass
class RecordPart:
    """The records of one part of a source (a file, a saved dataset, a Hub split) as Python values.

    Attributes:
        label: How errors name the part (the file, or the dataset with its split).
        unit: What ``row`` counts: ``line`` (JSONL), ``record`` (JSON list) or ``row`` (tables, datasets).
        records: ``(row, record)`` pairs, the record after the source's ``columns`` mapping.
    """

    label: str
    unit: Literal["line", "record", "row"]
    records: list[tuple[int, Any]]

    def location(self, row: int) -> str:
        """``file:line``, ``file:record N`` or ``source:row N``."""
        return format_location(self.label, row, self.unit)


def _part_records(label: str, ds: Any, unit: str, text: bool,
                  columns: dict[str, str] | None) -> tuple[list[tuple[int, Any]], list[DataProblem]]:
    """Numbered records of one opened part, as :func:`convert_batch` numbers them; bad JSON lines as problems."""
    records, problems = [], []
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        numbers = batch.get("number")
        for position in range(len(next(iter(batch.values())))):
            index = start + position
            row = numbers[position] if numbers is not None else (index + 1 if text else index)
            if not text:
                records.append((row, _renamed({key: batch[key][position] for key in batch}, columns)))
                continue
            line = batch["text"][position]
            if not line.strip():
                continue
            try:
                records.append((row, _renamed(json.loads(line), columns)))
            except json.JSONDecodeError as error:
                problems.append(DataProblem(label, row, None, f"invalid JSON: {error.msg} (column {error.colno})", unit))
            except RecursionError:
                problems.append(DataProblem(label, row, None, "invalid record: JSON nested too deeply", unit))
    return records, problems


def read_records(spec: str | os.PathLike | Source) -> tuple[list[RecordPart], list[DataProblem]]:
    """Every record of a source as a Python value, located as users find it; never raises on bad data.

    For record shapes that are not chat conversations (preference pairs): the same files, globs, saved
    datasets, Hub ids and ``columns`` mapping as :func:`read_source`, without the conversion. Table cells keep
    their Arrow values (lists of ``{role, content}`` stay lists; CSV holds text).

    Returns:
        One :class:`RecordPart` per file or dataset, and the problems found while reading: a source that cannot
        be read at all, an empty part, a line that is not JSON.
    """
    source = as_source(spec)
    try:
        opened = _open(source)
    except SourceError as error:
        return [], [DataProblem(error.label, None, None, error.message)]
    parts, problems = [], []
    for label, ds, unit, text, unreadable in opened:
        records, found = _part_records(label, ds, unit, text, source.columns) if ds is not None else ([], [])
        problems += unreadable + found
        if not records and not unreadable and not found:
            problems.append(DataProblem(label, None, None, "no records (it is empty)"))
        if ds is not None:
            parts.append(RecordPart(label, unit, records))
    return parts, problems
