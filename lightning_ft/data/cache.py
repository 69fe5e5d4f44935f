"""A disk cache of encoded conversations, so re-running (a sweep, a resume, a new config) skips tokenising.

Keyed by the conversations' content, the tokenizer (its full serialisation), the chat template, the
truncation and labelling settings (masking, stop tokens, reasoning) and the encoder's version: any change
to one of them is a different key. Entries are written atomically as int32 tensors and read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_ft.data.collate import Example
from lightning_ft.data.formats import Conversation
from lightning_ft.atomic import atomic_file
from lightning_ft.models import cache_dir

#: Bumped whenever encoding itself changes (labels, truncation), invalidating every entry.
#: 2: labels located in the full render, through the stop marker (no longer the newline after it).
ENCODING_VERSION = 2


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything about a tokenizer that changes its ids: vocabulary, merges, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()


def encoding_key(conversations: Sequence[Conversation], tokenizer: Any, chat_template: str | None,
                 max_length: int, truncation: str, labelling: Mapping[str, Any] | None = None) -> str:
    """The cache key of encoding ``conversations`` with these settings (``labelling``: the label settings)."""
    digest = hashlib.sha256()
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps([ENCODING_VERSION, tokenizer_fingerprint(tokenizer), template, max_length,
                              truncation, dict(labelling or {})], sort_keys=True).encode())
    for conversation in conversations:
        digest.update(json.dumps(conversation.messages, ensure_ascii=False).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "encoded" / f"{key}.pt"


def load(key: str) -> tuple[list[Example], dict[str, int]] | None:
    """The cached examples and the stats of encoding them, or ``None`` (a missing or unreadable entry)."""
    path = _path(key)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        ids, labels = entry["input_ids"].tolist(), entry["labels"].tolist()
        ends = entry["lengths"].cumsum(0).tolist()
    except Exception:  # noqa: BLE001 - a corrupt entry is a miss: encode again and overwrite it
        return None
    starts = [0, *ends[:-1]]
    examples = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(starts, ends)]
    return examples, {key: int(value) for key, value in entry["stats"].items()}


def save(key: str, examples: Sequence[Example], stats: dict[str, int]) -> None:
    """Store ``examples`` (and their stats) under ``key``, atomically; a failure to write is not an error."""
    path = _path(key)
    entry = {
        "input_ids": torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.int32),
        "labels": torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.int32),
        "lengths": torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int64),
        "stats": dict(stats),
    }
    try:
        with atomic_file(path) as staging:
            torch.save(entry, staging)
    except OSError:
        pass  # a read-only cache directory only costs the next run the tokenising
