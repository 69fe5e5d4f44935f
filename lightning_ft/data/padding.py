"""Padding: one helper for both sides, and one rule for the id that fills padded positions.

Training batches are padded on the right (:func:`~lightning_ft.data.collate.collate`); prompts to generate
from and benchmark contexts on the left, so that every row ends where the next token is predicted.

Example::

    >>> ids, mask = pad([[5, 6, 7], [8]], value=0, side="left")
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Padded positions are masked out of attention and of every loss and score, so any id gives the same
    numbers; one rule keeps every batch the same wherever it is built. (:func:`~lightning_ft.models.load_tokenizer`
    already sets a missing pad token to the end-of-sequence token.)
    """
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def padded_length(longest: int, pad_to_multiple_of: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``pad_to_multiple_of`` (unchanged when that is ``None`` or 0)."""
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else longest


def pad(rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"] = "right",
        length: int | None = None, pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack rows of ids into one ``(rows, length)`` long tensor, filling with ``value`` on ``side``.

    Args:
        rows: Token ids (or labels) per row.
        value: What fills the padded positions (a pad id, or ``-100`` for labels).
        side: ``right`` for training batches, ``left`` for prompts whose last token is where generation starts.
        length: The padded length; by default the longest row's, rounded up to ``pad_to_multiple_of``.
        pad_to_multiple_of: Round the default length up to a multiple of this (e.g. 8 for tensor cores).

    Returns:
        The padded tensor and its mask (a long tensor, 1 at the rows' own tokens, 0 at padding).
    """
    if length is None:
        length = padded_length(max((len(row) for row in rows), default=0), pad_to_multiple_of)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {index} has {len(row)} tokens, more than the padded length {length}")
        where = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[index, where] = torch.as_tensor(row, dtype=torch.long)
        mask[index, where] = 1
    return ids, mask
