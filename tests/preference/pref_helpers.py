"""Preference test data: small hand-written pairs on disk and encoded batches for the tiny model."""

from __future__ import annotations

import json
from pathlib import Path


def pair_record(index: int) -> dict:
    """A pair whose chosen reply is right and terse and whose rejected reply is wrong (lengths alternate)."""
    wrong = f"It is {index + 7}, I believe." if index % 2 else f"{index + 3}"
    return {"prompt": [{"role": "system", "content": "Answer briefly."},
                       {"role": "user", "content": f"What is {index} plus one?"}],
            "chosen": f"It is {index + 1}.", "rejected": wrong}


def write_pairs(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def write_pair_file(path: Path, count: int, start: int = 0) -> str:
    return write_pairs(path, [pair_record(i) for i in range(start, start + count)])
