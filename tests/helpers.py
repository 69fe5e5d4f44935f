"""Small shared builders for tests (data files on disk, modules on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path


def chat_record(index: int) -> dict:
    return {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"What is {index} plus one?"},
        {"role": "assistant", "content": f"It is {index + 1}."},
    ]}


def write_chat_file(path: Path, count: int, start: int = 0) -> str:
    path.write_text("".join(json.dumps(chat_record(i)) + "\n" for i in range(start, start + count)))
    return str(path)


def write_varied_chat_file(path: Path, count: int) -> str:
    """Conversations whose answers range from one to ~40 words, so padded batches are mostly padding."""
    records = []
    for i in range(count):
        record = chat_record(i)
        record["messages"][-1]["content"] = " ".join([f"It is {i + 1}."] * (1 + (i * 7) % 11))
        records.append(json.dumps(record) + "\n")
    path.write_text("".join(records))
    return str(path)


def trained_spans(tokenizer, example) -> list[str]:
    """Decode each run of consecutive trained labels."""
    spans, run = [], []
    for label in [*example["labels"], -100]:
        if label != -100:
            run.append(label)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def chat_template_ids(tokenizer, messages) -> list[int]:
    """The template's own tokenisation (transformers 5 returns a BatchEncoding, 4 a list)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
