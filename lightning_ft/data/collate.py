"""Chat-template tokenisation with assistant-only labels, truncation and padding: pure functions.

Labels are found without ``{% generation %}`` markers or searching for marker strings: the template
is rendered turn by turn and the token prefixes compared. For assistant message ``i`` the trained
span starts after ``render(messages[:i], add_generation_prompt=True)`` (so the assistant header stays
masked) and ends after ``render(messages[:i + 1])`` (so the end-of-turn token, e.g. ``<|im_end|>`` or
``<|eot_id|>``, is learned and the model knows when to stop).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_ft.data.formats import check_conversation

IGNORE_INDEX = -100
Example = dict[str, list[int]]


class EmptyLabelsError(ValueError):
    """A conversation that would contribute nothing to the loss (every label is ignored)."""


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template: str | None,
            add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )
    # transformers 5 returns a BatchEncoding by default, transformers 4 a plain list.
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    return list(ids)


def _boundary(tokenizer: Any, prefix: list[int], full: list[int], turn: int, side: Literal["start", "end"]) -> int:
    """Where ``prefix`` ends inside ``full``, in ``full``'s tokens.

    A BPE merge across the boundary (e.g. a header's ``"\\n\\n"`` token splitting when content follows)
    breaks an exact token prefix. Token strings concatenate to the underlying text for byte-level and
    SentencePiece BPE alike, so the rest of the prefix is matched as text; when a token of ``full``
    straddles the boundary it is left untrained (conservative on both sides).
    """
    common = 0
    for a, b in zip(prefix, full):
        if a != b:
            break
        common += 1
    if common == len(prefix):
        return common
    tail = "".join(tokenizer.convert_ids_to_tokens(prefix[common:]))
    text, end = "", common
    while end < len(full) and len(text) < len(tail):
        text += tokenizer.convert_ids_to_tokens(full[end])
        end += 1
    if not text.startswith(tail):
        raise ValueError(
            f"The chat template is not prefix-stable: rendering the conversation up to message {turn} "
            f"diverges from the full render at token {common} of {len(prefix)}, so assistant turns cannot "
            "be located. Templates that rewrite earlier turns (e.g. strip reasoning) need a `chat_template` "
            "override that renders every turn the same way."
        )
    straddles = len(text) > len(tail)
    return end - 1 if straddles and side == "end" else end


def assistant_spans(messages: Sequence[Mapping[str, Any]], tokenizer: Any, full: list[int],
                    chat_template: str | None = None) -> list[tuple[int, int]]:
    """Token ``[start, end)`` of every assistant turn's content plus its end-of-turn token(s) in ``full``.

    Args:
        messages: A conversation that passes :func:`~lightning_ft.data.formats.check_conversation`.
        tokenizer: A Hugging Face tokenizer with a chat template.
        full: The token ids of the whole rendered conversation.
        chat_template: Overrides the tokenizer's template.
    """
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = _render(tokenizer, messages[:index], chat_template, add_generation_prompt=True)
        turn = _render(tokenizer, messages[: index + 1], chat_template, add_generation_prompt=False)
        start = _boundary(tokenizer, header, full, index, "start")
        end = _boundary(tokenizer, turn, full, index, "end")
        spans.append((start, max(start, end)))
    return spans


def count_trained(labels: Sequence[int]) -> int:
    """How many labels take part in the loss."""
    return sum(label != IGNORE_INDEX for label in labels)


def truncate_example(example: Example, max_length: int, mode: Literal["cut", "drop"] = "cut") -> Example | None:
    """Fit an example into ``max_length`` tokens.

    Args:
        example: ``{"input_ids": [...], "labels": [...]}``.
        max_length: The longest sequence allowed.
        mode: ``"cut"`` keeps the first ``max_length`` tokens; ``"drop"`` returns ``None`` for a longer example.

    Returns:
        The example itself when it fits, a shortened copy, or ``None`` when dropped. Compare
        :func:`count_trained` before and after to count trained tokens lost.
    """
    if mode not in ("cut", "drop"):
        raise ValueError(f"mode={mode!r} is not one of: cut, drop")
    if len(example["input_ids"]) <= max_length:
        return example
    if mode == "drop":
        return None
    return {key: list(values[:max_length]) for key, values in example.items()}


def encode_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int | None = None,
                        chat_template: str | None = None) -> Example:
    """Tokenise a conversation with its chat template and label only the assistant turns.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``: optional system message, then user and
            assistant alternating, ending with the assistant.
        tokenizer: A Hugging Face tokenizer with a chat template.
        max_length: Keep only the first ``max_length`` tokens.
        chat_template: A Jinja template overriding the tokenizer's.

    Returns:
        ``input_ids`` exactly as ``apply_chat_template`` produces them, and ``labels`` aligned with
        them (the model shifts internally): ``-100`` except on each assistant turn's content and
        end-of-turn token(s).

    Raises:
        ValueError: The conversation breaks the ordering rules, or the template is not prefix-stable.
        EmptyLabelsError: No token is trained, e.g. truncation removed every assistant token.

    Example:
        >>> example = encode_conversation(
        ...     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)
        >>> tokenizer.decode([t for t in example["labels"] if t != -100])
        'Hello!<|im_end|>\\n'
    """
    problems = check_conversation(messages)
    if problems:
        raise ValueError("Invalid conversation: " + "; ".join(problems))
    full = _render(tokenizer, messages, chat_template, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for start, end in assistant_spans(messages, tokenizer, full, chat_template):
        labels[start:end] = full[start:end]
    example = {"input_ids": full, "labels": labels}
    if not count_trained(labels):
        raise EmptyLabelsError("conversation yields no trained token: the chat template renders no assistant tokens")
    if max_length is not None:
        example = truncate_example(example, max_length, "cut")
        if not count_trained(example["labels"]):
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            raise EmptyLabelsError(
                f"conversation yields no trained token after truncation to max_length={max_length}: "
                f"its first assistant token is at position {first}"
            )
    return example


def collate(examples: Sequence[Example], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest in the batch (rounded up to ``pad_to_multiple_of``).

    Args:
        examples: Dicts with ``input_ids`` and ``labels`` of equal length.
        pad_token_id: Fills ``input_ids`` past each example's end; those positions get label ``-100``
            and attention mask ``0``, so any id works.
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for tensor cores).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each a ``(batch, length)`` long tensor; and
        ``replay_tokens``, a bool mask of the tokens of replay conversations, when the examples carry a
        ``replay`` mark.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example["input_ids"])
        input_ids[row, :size] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :size] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :size] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "replay" in examples[0]:
        flags = torch.tensor([bool(example["replay"][0]) for example in examples])
        batch["replay_tokens"] = flags[:, None] & attention_mask.bool()
    return batch


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group examples into rows of at most ``max_length`` tokens: first fit, longest first (indices per row).

    Args:
        lengths: Token count of each example; none may exceed ``max_length``.
        max_length: Tokens per row.
    """
    too_long = [i for i, length in enumerate(lengths) if length > max_length]
    if too_long:
        raise ValueError(f"examples {too_long} are longer than max_length={max_length}: truncate them first")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return [sorted(row) for row in rows]


def collate_packed(examples: Sequence[Example], pad_token_id: int, max_length: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pack a batch's examples into as few rows of at most ``max_length`` tokens as fit (no padding between them).

    Position ids restart at 0 for every conversation, and no ``attention_mask`` is returned: Hugging Face
    models then keep attention inside each conversation (block-diagonal causal masks for SDPA and eager,
    variable-length kernels for flash attention), so every conversation's logits equal its unpacked ones.
    Each conversation's first label is ignored, as unpacked batches never train position 0: the last token of
    one conversation never learns to predict the next conversation. The row tails are padding that forms its
    own block, with ignored labels.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` of shape ``(rows, length)``; ``token_mask``, true at
        real (non-pad) tokens; and ``replay_tokens``, a bool mask of the tokens of replay conversations,
        when the examples carry a ``replay`` mark.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    rows = pack_rows([len(example["input_ids"]) for example in examples], max_length)
    marked = "replay" in examples[0]
    ids, labels, positions, replay = [], [], [], []
    for row in rows:
        ids.append([token for i in row for token in examples[i]["input_ids"]])
        labels.append([label for i in row for label in [IGNORE_INDEX, *examples[i]["labels"][1:]]])
        positions.append([position for i in row for position in range(len(examples[i]["input_ids"]))])
        if marked:
            replay.append([bool(examples[i]["replay"][0]) for i in row for _ in examples[i]["input_ids"]])
    length = max(len(row) for row in ids)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    for r in range(len(rows)):
        pad = length - len(ids[r])
        ids[r] += [pad_token_id] * pad
        labels[r] += [IGNORE_INDEX] * pad
        positions[r] += range(pad)
        if marked:
            replay[r] += [False] * pad
    sizes = [sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
             "position_ids": torch.tensor(positions, dtype=torch.long),
             "token_mask": torch.arange(length)[None, :] < torch.tensor(sizes)[:, None]}
    if marked:
        batch["replay_tokens"] = torch.tensor(replay, dtype=torch.bool)
    return batch


@dataclass(frozen=True)
class ChatCollator:
    """:func:`collate` or :func:`collate_packed` with settings bound, for ``DataLoader(collate_fn=...)``
    (picklable for workers).

    Args:
        pad_token_id: Id that fills padded positions.
        pad_to_multiple_of: Round each batch's length up to a multiple of this.
        pack_length: Pack each batch into rows of at most this many tokens; ``None`` pads each example to
            the batch's longest instead.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    pack_length: int | None = None

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.pack_length is not None:
            return collate_packed(examples, self.pad_token_id, self.pack_length, self.pad_to_multiple_of)
        return collate(examples, self.pad_token_id, self.pad_to_multiple_of)
