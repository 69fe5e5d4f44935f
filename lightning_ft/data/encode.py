"""Conversations (Arrow) -> labelled token ids (Arrow), with worker processes and a validated on-disk cache.

:func:`encode_batch` is the one place that turns conversations into training examples: it calls
:func:`~lightning_ft.data.collate.encode_conversations` on a batch (one render of the template each, one
batched tokenisation) and records the truncation counts per row.

:func:`encode_dataset` runs it with ``datasets.map`` over ``num_proc`` processes and keeps the result
under ``$LIGHTNING_FT_CACHE/encoded/<key>``, keyed by the conversations' content, the tokenizer, the
chat template and the truncation settings. An entry records its row count, token count and a checksum
of its token ids and labels, and is checked against them before use: a damaged entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pytorch_lightning.utilities import rank_zero_warn

from lightning_ft.data.collate import (
    EmptyLabelsError,
    count_trained,
    encode_conversations,
    truncate_example,
)
from lightning_ft.atomic import atomic_directory
from lightning_ft.data.pages import MappedPages, Releasing, dataset_files
from lightning_ft.data.sources import datasets_progress
from lightning_ft.models import cache_dir

#: Bumped whenever encoding itself changes (labels, truncation), invalidating every entry.
ENCODING_VERSION = 3
#: Status of an encoded row.
KEPT, DROPPED, NO_LABELS, TEMPLATE_ERROR = 0, 1, 2, 3
_PARALLEL_FROM = 2000


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything about a tokenizer that changes its ids: vocabulary, merges, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()


def encode_batch(batch: dict[str, list], *, tokenizer: Any, chat_template: str | None, max_length: int,
                 truncation: str, labelling: Mapping[str, Any]) -> dict[str, list]:
    """``datasets.map`` function: conversations -> ``input_ids``, ``labels`` and per-row counts.

    The one place that calls :func:`~lightning_ft.data.collate.encode_conversations` for training data. Every
    input row gives one output row with a ``status`` (kept, dropped by truncation, no trained token, template
    error), so the counts of a cache entry come from the entry itself.
    """
    # Arrow stores every message with every key; an absent ``train`` opt-out comes back as None.
    conversations = [[{k: v for k, v in m.items() if v is not None} for m in chat] for chat in batch["messages"]]
    results = encode_conversations(conversations, tokenizer, chat_template=chat_template, **labelling)
    rows = []
    for result in results:
        status, error, trained, lost, cut, example = KEPT, "", 0, 0, False, None
        if isinstance(result, EmptyLabelsError):
            status, error = NO_LABELS, str(result)
        elif isinstance(result, ValueError):  # a template problem, the same for every conversation
            status, error = TEMPLATE_ERROR, str(result)
        else:
            full_trained = count_trained(result["labels"])
            kept = truncate_example(result, max_length, truncation)
            if kept is None:
                status = DROPPED
            else:
                cut = kept is not result
                trained = count_trained(kept["labels"]) if cut else full_trained
                lost, example = full_trained - trained, kept
                if not trained:
                    status, example = NO_LABELS, None
                    error = (f"conversation yields no trained token after truncation to max_length={max_length} "
                             "(raise max_length, or set truncation='drop' to skip such conversations)")
        ids, labels = (example["input_ids"], example["labels"]) if example is not None else ([], [])
        rows.append((ids, labels, len(ids), trained, lost, cut, status, error))
    columns = ("input_ids", "labels", "length", "trained", "lost", "truncated", "status", "error")
    out = {key: list(values) for key, values in zip(columns, zip(*rows))} if rows else {key: [] for key in columns}
    return {**out, "row": batch["row"], "part": batch["part"]}


def _features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32"),
                     "trained": Value("int32"), "lost": Value("int32"), "truncated": Value("bool"),
                     "status": Value("int8"), "error": Value("string"), "row": Value("int64"),
                     "part": Value("int32")})


def _digest(dataset: Any, columns: list[str]) -> str:
    """A content hash of ``columns`` (Arrow IPC bytes of each batch), selections and slices included."""
    import xxhash

    digest, pages = xxhash.xxh3_128(), MappedPages(dataset_files(dataset))
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=20_000):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
        pages.release()  # the pass leaves no more of the file resident than a batch
    return digest.hexdigest()


def content_digest(conversations: Any) -> str:
    """A content hash of a dataset of conversations (``messages``, ``row``, ``part``)."""
    return _digest(conversations, ["messages", "row", "part"])


def encoding_key(conversations: Any, tokenizer: Any, chat_template: str | None, max_length: int,
                 truncation: str, labelling: Mapping[str, Any] | None = None) -> str:
    """The cache key of encoding ``conversations`` (an Arrow dataset with ``messages``) with these settings."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    settings = json.dumps([ENCODING_VERSION, tokenizer_fingerprint(tokenizer), template, max_length, truncation,
                           dict(labelling or {})], sort_keys=True)
    return hashlib.sha256((settings + content_digest(conversations)).encode()).hexdigest()


def _file_digest(files: list[Path], columns: list[str]) -> str:
    """A content hash of ``columns`` of Arrow stream files, read a record batch at a time.

    Read, not memory-mapped: every page of a mapped file read stays in the process's resident memory, and
    the token ids are the largest data of a run.
    """
    import xxhash

    digest = xxhash.xxh3_128()
    for file in files:
        with pa.OSFile(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                sink = pa.BufferOutputStream()
                selected = batch.select(columns)
                with pa.ipc.new_stream(sink, selected.schema) as writer:
                    writer.write_batch(selected)
                digest.update(sink.getvalue())
    return digest.hexdigest()


def _entry_record(encoded: Any, files: list[Path]) -> dict[str, Any]:
    lengths = np.asarray(encoded.data.column("length").to_numpy(), dtype=np.int64)
    return {"version": ENCODING_VERSION, "rows": len(encoded), "tokens": int(lengths.sum()),
            "checksum": _file_digest(files, ["input_ids", "labels"])}


def _load_entry(path: Path) -> Any | None:
    """The cached dataset, or ``None`` when missing; a damaged entry (counts, lengths, checksum) is reported."""
    import datasets

    meta = path / "entry.json"
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
        shards = [datasets.Dataset.from_file(str(path / name)) for name in record["shards"]]
        encoded = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
        lengths = pc.list_value_length(encoded.data.column("input_ids")).to_numpy(zero_copy_only=False)
        consistent = (np.array_equal(lengths, encoded.data.column("length").to_numpy())
                      and np.array_equal(lengths, pc.list_value_length(encoded.data.column("labels"))
                                         .to_numpy(zero_copy_only=False)))
        actual = _entry_record(encoded, [path / name for name in record["shards"]])
    except Exception as error:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
        rank_zero_warn(f"Encode cache entry {path.name} is unreadable ({type(error).__name__}): re-encoding.")
        return None
    expected = {key: record.get(key) for key in ("version", "rows", "tokens", "checksum")}
    if not consistent or actual != expected:
        rank_zero_warn(f"Encode cache entry {path.name} does not match what it recorded (rows, lengths or token "
                       "checksum): re-encoding.")
        return None
    return encoded


def encode_dataset(conversations: Any, tokenizer: Any, chat_template: str | None, max_length: int,
                   truncation: str, labelling: Mapping[str, Any] | None = None, num_proc: int | None = None,
                   cache: bool = True,
                   description: str = "Tokenising") -> Any:
    """Encode an Arrow dataset of conversations (``messages``, ``row``, ``part``) into one encoded row each.

    Args:
        conversations: The checked conversations.
        tokenizer: A Hugging Face tokenizer with a chat template.
        chat_template: Overrides the tokenizer's template.
        max_length: Longest example; see ``truncation`` (``cut`` or ``drop``).
        truncation: ``cut`` keeps the first ``max_length`` tokens, ``drop`` marks the row dropped.
        labelling: ``stop_tokens``, ``masking`` and ``train_reasoning`` for ``encode_conversations``.
        num_proc: Worker processes for large data.
        cache: Serve and store the result under ``$LIGHTNING_FT_CACHE/encoded`` (validated before use).
        description: The progress line's label.

    Returns:
        A memory-mapped dataset with ``input_ids``, ``labels``, ``length``, ``trained``, ``lost``,
        ``truncated``, ``status``, ``error``, ``row`` and ``part`` per conversation, in order.
    """
    labelling = dict(labelling or {})
    key = encoding_key(conversations, tokenizer, chat_template, max_length, truncation, labelling) if cache else None
    target = cache_dir() / "encoded" / key if key else None
    if target is not None and (hit := _load_entry(target)) is not None:
        return hit
    root = cache_dir() / "encoded"
    root.mkdir(parents=True, exist_ok=True)
    procs = num_proc if num_proc and num_proc > 1 and len(conversations) >= _PARALLEL_FROM else None
    staging = Path(tempfile.mkdtemp(prefix=".encoding-", dir=root))
    try:
        with datasets_progress(len(conversations)):
            encoded = conversations.map(
                Releasing(encode_batch, conversations), batched=True, batch_size=512, num_proc=procs,
                desc=description, features=_features(), remove_columns=conversations.column_names,
                cache_file_name=str(staging / "data.arrow"), new_fingerprint=(key or os.urandom(16).hex())[:32],
                fn_kwargs={"tokenizer": tokenizer, "chat_template": chat_template, "max_length": max_length,
                           "truncation": truncation, "labelling": labelling})
        if target is not None and not bool(pc.any(pc.equal(encoded.data.column("status"), TEMPLATE_ERROR)).as_py()):
            _store(target, staging, encoded)
    finally:
        # The memory map keeps the data readable after its files are unlinked (POSIX).
        shutil.rmtree(staging, ignore_errors=True)
    return encoded


def _store(target: Path, staging: Path, encoded: Any) -> None:
    """Move the map's Arrow shards into the cache entry with their record; a failure only costs the next run."""
    try:
        with atomic_directory(target) as entry:
            shards = sorted(p.name for p in staging.glob("*.arrow"))
            for name in shards:
                os.link(staging / name, entry / name) if _same_device(staging, entry) else \
                    shutil.copyfile(staging / name, entry / name)
            record = {**_entry_record(encoded, [entry / name for name in shards]), "shards": shards}
            (entry / "entry.json").write_text(json.dumps(record))
    except OSError:
        pass


def _same_device(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev
