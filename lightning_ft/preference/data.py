"""Preference data: records -> (prompt messages, chosen reply, rejected reply) -> two labelled sequences.

Two record shapes are understood, from any source of the data layer (:mod:`lightning_ft.data.sources`: JSONL,
JSON lists, Parquet, CSV, Arrow, globs, saved datasets, Hub ids, with a ``columns`` mapping)::

    explicit prompt   {"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": "..." | [messages]}
    conversations     {"chosen": [messages], "rejected": [messages]}      (UltraFeedback style)

A side given as messages ends with the assistant reply being compared; any messages before it extend the
prompt and must be the same on both sides. Every conversation then passes the SFT ordering rules
(:func:`~lightning_ft.data.formats.check_conversation`). Bad records become
:class:`~lightning_ft.data.formats.DataProblem` with file, line and field.

Encoding reuses SFT's :func:`~lightning_ft.data.collate.encode_conversation` on ``prompt + [reply]`` for each
side, so the tokens are exactly what the chat template renders and the reply's span includes its stop marker;
only the final assistant reply is scored (earlier assistant turns are prompt).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ft.data.collate import IGNORE_INDEX, EmptyLabelsError, collate, encode_conversation
from lightning_ft.data.formats import DataError, DataProblem, Message, _type_name, check_conversation
from lightning_ft.data.sources import Source, read_records

SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One checked preference pair.

    Attributes:
        prompt: The conversation before the replies (ends with a user message).
        chosen: The preferred assistant reply.
        rejected: The dispreferred assistant reply.
        source: ``file:line`` or ``file:record N``.
    """

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str

    def conversation(self, side: str) -> list[Message]:
        """The prompt followed by the ``chosen`` or ``rejected`` reply."""
        return [*self.prompt, Message(role="assistant", content=getattr(self, side))]


def _messages(value: Any, field: str, default_role: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """A string (one message of ``default_role``) or a list of role/content messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}], []
    if not isinstance(value, list) or not value:
        return [], [(field, f"must be a string or a non-empty list of messages, got {_type_name(value)}")]
    problems = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not {"role", "content"} <= set(item):
            problems.append((f"{field}[{index}]", "must be an object with 'role' and 'content'"))
    return ([] if problems else [{"role": m["role"], "content": m["content"]} for m in value]), problems


def _split_reply(messages: list[dict[str, Any]], field: str) -> tuple[list[dict[str, Any]], Any, list[tuple[str, str]]]:
    """``(messages before the reply, the reply's content, problems)``: the side must end with an assistant reply."""
    if messages[-1]["role"] != "assistant":
        return [], None, [(f"{field}[{len(messages) - 1}].role",
                           f"a side must end with the assistant reply being compared, got {messages[-1]['role']!r}")]
    return messages[:-1], messages[-1]["content"], []


def parse_record(record: Any, system_prompt: str | None = None) -> tuple[PreferencePair | None, list[tuple[str | None, str]]]:
    """Turn one parsed record into prompt and replies, or problems as ``(field, text)``; ``source`` is left blank."""
    if not isinstance(record, dict):
        return None, [(None, f"expected a JSON object, got {_type_name(record)}")]
    missing = [key for key in SIDES if key not in record]
    if missing:
        has = ", ".join(record) or "nothing"
        return None, [(key, f"missing field {key!r} (preference records need chosen and rejected; has: {has})")
                      for key in missing]
    prompt: list[dict[str, Any]] = []
    problems: list[tuple[str | None, str]] = []
    if "prompt" in record:
        prompt, found = _messages(record["prompt"], "prompt", "user")
        problems += found
    sides, replies = {}, {}
    for side in SIDES:
        messages, found = _messages(record[side], side, "assistant")
        problems += found
        if messages:
            sides[side], replies[side], found = _split_reply(messages, side)
            problems += found
    if problems:
        return None, problems
    if sides["chosen"] != sides["rejected"]:
        at = next((i for i, (a, b) in enumerate(zip(sides["chosen"], sides["rejected"])) if a != b),
                  min(len(sides["chosen"]), len(sides["rejected"])))
        return None, [("rejected", f"the prompt differs between sides: chosen and rejected diverge at message {at}, "
                                   "before the final reply (both sides must share the conversation up to it)")]
    prompt += sides["chosen"]
    if system_prompt is not None and (not prompt or prompt[0]["role"] != "system"):
        prompt.insert(0, {"role": "system", "content": system_prompt})
    for side in SIDES:
        for issue in check_conversation([*prompt, {"role": "assistant", "content": replies[side]}]):
            problems.append((side if issue.startswith(f"messages[{len(prompt)}]") else "prompt", issue))
    if problems:
        return None, list(dict.fromkeys(problems))  # a prompt problem is found once per side
    typed = tuple(Message(role=m["role"], content=m["content"]) for m in prompt)
    return PreferencePair(typed, replies["chosen"], replies["rejected"], ""), []


def _table_record(record: dict[str, Any], csv: bool) -> dict[str, Any]:
    """A table row as a JSON record: empty (null) cells are absent, and a message list stored as JSON text (the way
    CSV holds one) is parsed. CSV cells that type inference read as numbers (a reply ``3``) are text again."""
    out = {}
    for key, value in record.items():
        if value is None:
            continue
        if csv and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if key in ("prompt", *SIDES) and isinstance(value, str) and value.lstrip()[:1] == "[":
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None  # plain text that starts with a bracket
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed):
                value = parsed
        out[key] = value
    return out


def scan_pairs(source: str | Path | Source,
               system_prompt: str | None = None) -> tuple[list[PreferencePair], list[DataProblem]]:
    """Read preference pairs from a source; never raises on bad data (every bad record becomes a :class:`DataProblem`).

    Args:
        source: A ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file, a glob of them, a
            ``Dataset.save_to_disk`` directory, a Hub dataset id, or a :class:`~lightning_ft.data.sources.Source`
            (with ``subset``, ``split``, ``revision`` and a ``columns`` mapping onto ``prompt``/``chosen``/``rejected``).
        system_prompt: System message inserted into prompts that have none.

    Returns:
        The good pairs, each with its ``file:line`` (``source:row N`` for tables and datasets), and every problem.
    """
    parts, problems = read_records(source if isinstance(source, Source) else str(source))
    pairs = []
    for part in parts:
        for number, record in part.records:
            if part.unit == "row" and isinstance(record, dict):
                record = _table_record(record, csv=part.label.endswith(".csv"))
            pair, issues = parse_record(record, system_prompt)
            problems += [DataProblem(part.label, number, field, text, part.unit) for field, text in issues]
            if pair is not None:
                pairs.append(PreferencePair(pair.prompt, pair.chosen, pair.rejected, part.location(number)))
    problems.sort(key=lambda problem: (problem.path, problem.line or 0))
    return pairs, problems


def read_pairs(source: str | Path | Source, system_prompt: str | None = None) -> list[PreferencePair]:
    """Like :func:`scan_pairs`, but raise one :class:`DataError` listing every problem if there are any."""
    pairs, problems = scan_pairs(source, system_prompt)
    if problems:
        raise DataError(problems)
    return pairs


def encode_side(pair: PreferencePair, side: str, tokenizer: Any, max_length: int, chat_template: str | None = None,
                stop_tokens: Sequence[int | str] | None = None) -> dict[str, list[int]]:
    """Tokenise ``prompt + [reply]`` with SFT's labelling, scoring only the final reply and its stop marker.

    Longer sequences keep their first ``max_length`` tokens; a reply that would lose every token raises
    :class:`~lightning_ft.data.collate.EmptyLabelsError`. ``stop_tokens`` are the model's end-of-reply tokens
    (see :func:`~lightning_ft.data.collate.encode_conversation`).
    """
    example = encode_conversation(pair.conversation(side), tokenizer, chat_template=chat_template,
                                  stop_tokens=stop_tokens, masking="last_assistant")
    start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    if start >= max_length:
        raise EmptyLabelsError(f"{pair.source}: the {side} reply starts at token {start}, past "
                               f"max_length={max_length}: raise max_length or shorten the prompt")
    return {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}


def encode_pair(pair: PreferencePair, tokenizer: Any, max_length: int, chat_template: str | None = None,
                stop_tokens: Sequence[int | str] | None = None) -> dict[str, dict[str, list[int]]]:
    """Both sides of a pair encoded by :func:`encode_side`: ``{"chosen": {...}, "rejected": {...}}``."""
    return {side: encode_side(pair, side, tokenizer, max_length, chat_template, stop_tokens) for side in SIDES}


def collate_pairs(examples: Sequence[Mapping[str, Any]], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Stack the chosen sides, then the rejected sides, into one padded batch for a single forward.

    Args:
        examples: Outputs of :func:`encode_pair`, optionally with ``ref_logps`` (reference log-probabilities
            of chosen and rejected, precomputed).
        pad_token_id: Id that fills padded positions.
        pad_to_multiple_of: Round the padded length up to a multiple of this.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` of shape ``(2 * pairs, length)``: rows ``[0, pairs)``
        are the chosen sides, rows ``[pairs, 2 * pairs)`` the rejected sides of the same pairs; and
        ``ref_logps`` of shape ``(2 * pairs,)`` in the same order when every example carries them.
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one pair")
    batch = collate([example[side] for side in SIDES for example in examples], pad_token_id, pad_to_multiple_of)
    if all("ref_logps" in example for example in examples):
        batch["ref_logps"] = torch.tensor([example["ref_logps"][i] for i in range(2) for example in examples])
    return batch


@dataclass(frozen=True)
class PairCollator:
    """:func:`collate_pairs` with settings bound, for ``DataLoader(collate_fn=...)`` (picklable for workers)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.pad_token_id, self.pad_to_multiple_of)
