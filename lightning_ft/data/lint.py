"""The model-free data checks in one streaming pass per split, at memory bounded by a few numbers per row.

A split is any :class:`Rows`: conversations in Arrow (:class:`ArrowRows`, what ``fit`` and ``check-data``
read) or a list of :class:`~lightning_ft.data.formats.Conversation`. One pass over its batches keeps, per
conversation, 64-bit hashes (of the raw messages, the normalised prompt and answer, the system prompt, the
answer's JSON keys), the answer's shape and the prompt's and answer's lengths, and MinHash band hashes
(:mod:`lightning_ft.data.minhash`). Every finding is computed from those arrays; only the rows a finding
names are read again (for its location and the previews it quotes), as are the answers of a JSON majority
for the rare-value check.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import xxhash

from lightning_ft.data import minhash
from lightning_ft.data.minhash import normalize
from lightning_ft.data.pages import MappedPages, dataset_files

SHAPES = ("JSON object", "JSON array", "broken JSON", "code block", "list", "text")
_BATCH = 1000


class Rows(Protocol):
    """Conversations a check can stream over and read back by index."""

    def __len__(self) -> int: ...

    def batches(self) -> Iterator[list[Sequence[Mapping[str, Any]]]]:
        """The message lists in order, a batch at a time."""

    def messages(self, index: int) -> Sequence[Mapping[str, Any]]: ...

    def location(self, index: int) -> str: ...

    def conversations(self) -> Iterator[Any]:
        """Every conversation in order as a :class:`~lightning_ft.data.formats.Conversation`, one at a time."""


class ConversationRows:
    """A list of :class:`~lightning_ft.data.formats.Conversation` as :class:`Rows`."""

    def __init__(self, conversations: Sequence[Any]) -> None:
        self.items = conversations

    def __len__(self) -> int:
        return len(self.items)

    def batches(self) -> Iterator[list[Sequence[Mapping[str, Any]]]]:
        for start in range(0, len(self.items), _BATCH):
            yield [c.messages for c in self.items[start:start + _BATCH]]

    def messages(self, index: int) -> Sequence[Mapping[str, Any]]:
        return self.items[index].messages

    def location(self, index: int) -> str:
        return self.items[index].source

    def conversations(self) -> Iterator[Any]:
        yield from self.items


class ArrowRows:
    """The conversations of ``(SourceData, dataset)`` parts (``messages``, ``row``, ``part`` columns) as :class:`Rows`."""

    def __init__(self, parts: Sequence[tuple[Any, Any]]) -> None:
        self.parts = [(source, dataset) for source, dataset in parts if dataset is not None and len(dataset)]
        self.starts = list(np.cumsum([0] + [len(dataset) for _, dataset in self.parts]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, columns: list[str]) -> Iterator[tuple[Any, dict[str, list]]]:
        """``(source, batch of columns)`` of every part in order, in one pass that leaves no more of the
        memory-mapped files resident than a few batches."""
        for source, dataset in self.parts:
            pages = MappedPages(dataset_files(dataset))
            for batch in dataset.select_columns(columns).iter(batch_size=_BATCH):
                yield source, batch
                pages.tick()
            pages.release()

    def batches(self) -> Iterator[list[Sequence[Mapping[str, Any]]]]:
        for _, batch in self._read(["messages"]):
            yield batch["messages"]

    def _record(self, index: int) -> tuple[Any, dict[str, Any]]:
        part = bisect.bisect_right(self.starts, index) - 1
        source, dataset = self.parts[part]
        return source, dataset[index - int(self.starts[part])]

    def messages(self, index: int) -> Sequence[Mapping[str, Any]]:
        return self._record(index)[1]["messages"]

    def location(self, index: int) -> str:
        source, record = self._record(index)
        return source.location(record["part"], record["row"])

    def conversations(self) -> Iterator[Any]:
        from lightning_ft.data.formats import Conversation

        for source, batch in self._read(["messages", "part", "row"]):
            for messages, part, row in zip(batch["messages"], batch["part"], batch["row"]):
                # Arrow gives every message every key; an absent ``train`` opt-out comes back as None.
                yield Conversation(tuple({k: v for k, v in m.items() if v is not None} for m in messages),
                                   source.location(part, row))


def _last_assistant(messages: Sequence[Mapping[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def prompt_and_answer(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """:func:`prompt_of` and :func:`answer_of`, finding the last assistant turn once."""
    last = _last_assistant(messages)
    return "\n".join(m["content"] for m in messages[:last] if m["role"] != "system"), messages[last]["content"]


def prompt_of(messages: Sequence[Mapping[str, Any]]) -> str:
    """Every non-system message before the last assistant turn."""
    return prompt_and_answer(messages)[0]


def answer_of(messages: Sequence[Mapping[str, Any]]) -> str:
    """The last assistant message."""
    return messages[_last_assistant(messages)]["content"]


def system_of(messages: Sequence[Mapping[str, Any]]) -> str | None:
    return messages[0]["content"] if messages[0]["role"] == "system" else None


def digest(text: str | None) -> int:
    """A stable 64-bit hash (0 for ``None``)."""
    if text is None:
        return 0
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) | 1


@dataclass
class Features:
    """What the checks need of each conversation of a split, as arrays."""

    raw: np.ndarray
    prompt: np.ndarray
    answer: np.ndarray
    system: np.ndarray
    shape: np.ndarray
    keys: np.ndarray
    prompt_length: np.ndarray
    answer_length: np.ndarray
    text_bands: np.ndarray
    prompt_bands: np.ndarray | None


def response_shape(text: str) -> tuple[str, tuple[str, ...] | None, str | None]:
    """Classify an answer: ``(shape, JSON object keys or None, parse error or None)``.

    Shapes: ``JSON object``, ``JSON array``, ``broken JSON`` (starts like JSON, does not parse),
    ``code block``, ``list`` (every line a bullet or number) and ``text``.
    """
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as error:
            return "broken JSON", None, f"{error.msg} at column {error.colno}"
        if isinstance(value, dict):
            return "JSON object", tuple(value), None
        return "JSON array", None, None
    if stripped.startswith("```"):
        return "code block", None, None
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) >= 2 and all(re.match(r"\s*([-*•]|\d+[.)])\s", line) for line in lines):
        return "list", None, None
    return "text", None, None


_DTYPES = {"raw": np.uint64, "prompt": np.uint64, "answer": np.uint64, "system": np.uint64, "keys": np.uint64,
           "shape": np.int8, "prompt_length": np.int64, "answer_length": np.int64}


def features(rows: Rows, prompt_bands: bool = False, progress: Any = None) -> Features:
    """One pass over ``rows``; ``prompt_bands`` also MinHashes the prompts alone (for leakage); ``progress``
    (e.g. a :class:`~lightning_ft.progress.StageProgress`) is advanced by each batch's size.

    Each batch's values become arrays at once: a million conversations never stand as Python integers.
    """
    columns: dict[str, list[np.ndarray]] = {key: [] for key in Features.__dataclass_fields__}
    for batch in rows.batches():
        pairs = [prompt_and_answer(messages) for messages in batch]
        prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
        plain_prompts, plain_answers = [normalize(p) for p in prompts], [normalize(a) for a in answers]
        values: dict[str, list] = {key: [] for key in _DTYPES}
        for messages, prompt, answer, reply in zip(batch, plain_prompts, plain_answers, answers):
            shape, keys, _ = response_shape(reply)
            values["raw"].append(digest("\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)))
            values["prompt"].append(digest(prompt))
            values["answer"].append(digest(answer))
            values["system"].append(digest(system_of(messages)))
            values["shape"].append(SHAPES.index(shape))
            values["keys"].append(digest(json.dumps(keys)) if keys is not None else 0)
        values["prompt_length"], values["answer_length"] = [len(p) for p in prompts], [len(a) for a in answers]
        for key, dtype in _DTYPES.items():
            columns[key].append(np.array(values[key], dtype=dtype))
        # normalize(prompt + "\n" + answer) is the two normalised texts joined by a space.
        columns["text_bands"].append(minhash.band_hashes(
            [f"{p} {a}".strip() for p, a in zip(plain_prompts, plain_answers)], normalized=True))
        if prompt_bands:
            columns["prompt_bands"].append(minhash.band_hashes(plain_prompts, normalized=True))
        if progress is not None:
            progress.advance(len(batch))
    empty = np.zeros((0, minhash.BANDS), dtype=np.uint64)
    arrays = {key: np.concatenate(columns[key]) if columns[key] else np.zeros(0, dtype=dtype)
              for key, dtype in _DTYPES.items()}
    return Features(**arrays, text_bands=np.concatenate(columns["text_bands"]) if columns["text_bands"] else empty,
                    prompt_bands=(np.concatenate(columns["prompt_bands"]) if columns["prompt_bands"] else empty)
                    if prompt_bands else None)


def first_of_each(values: np.ndarray) -> np.ndarray:
    """For each position, the first position holding the same value."""
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def majority(values: np.ndarray) -> tuple[Any, int, int]:
    """``(most common value, its count, distinct values)``; ties go to the value seen first."""
    unique, first, counts = np.unique(values, return_index=True, return_counts=True)
    top = np.lexsort((first, -counts))[0]
    return unique[top], int(counts[top]), len(unique)


def value_counts(rows: Rows, indices: np.ndarray, keys: tuple[str, ...]) -> dict[str, tuple[Counter, dict]]:
    """Per JSON key: counts of the scalar values of the answers at ``indices``, and one value per hash.

    A key whose values are mostly distinct (free text rather than labels) is given up as soon as that is
    certain, so at most a fifth of the rows' values are ever held.
    """
    wanted = set(indices.tolist())
    cap = len(indices) // 5
    tallies: dict[str, tuple[Counter, dict]] = {key: (Counter(), {}) for key in keys}
    position = 0
    for batch in rows.batches():
        for offset, messages in enumerate(batch):
            if position + offset not in wanted:
                continue
            value = json.loads(answer_of(messages))
            for key in list(tallies):
                item = value[key]
                if isinstance(item, (str, int, float, bool)):
                    counts, seen = tallies[key]
                    code = digest(json.dumps(item))
                    counts[code] += 1
                    seen.setdefault(code, item)
                    if len(counts) > cap:
                        del tallies[key]
        position += len(batch)
    return tallies


def length_outliers(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Indices far longer or shorter than the rest (robust z-score on log length and a 3x ratio), and the typical length."""
    logs = np.log1p(lengths.astype(np.float64))
    median = float(np.median(logs))
    spread = 1.4826 * float(np.median(np.abs(logs - median))) or 1e-9
    typical = round(math.expm1(median))
    z = (logs - median) / spread
    odd = ((z > 3.5) & (lengths > 3 * typical)) | ((z < -3.5) & (3 * lengths < typical))
    return np.flatnonzero(odd), typical
