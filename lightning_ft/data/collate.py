"""Chat-template tokenisation with labels on the replies and their stop markers, padding, packing: pure functions.

The full render of a conversation is the single truth. The input ids are the template's text tokenised
exactly as ``apply_chat_template`` does it (no special tokens added), plus one eos token when the template
writes no stop marker after the final reply. Each reply and the stop marker the model must learn to emit
(``<|im_end|>``, ``<|eot_id|>``, an eos, GLM's next role tag...) are located inside that text
(:mod:`lightning_ft.data.labels`) and mapped to tokens with the tokenizer's offset mapping; everything
else (system, user, headers, template filler after the marker) keeps label ``-100``.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_ft.data.formats import check_conversation
from lightning_ft.data.labels import (
    ReplySpan,
    TemplateRefusedError,
    TemplateTraits,
    appended_stop,
    locate_replies,
    render_plain,
    render_text,
    stop_texts,
    template_traits,
)
from lightning_ft.data.padding import pad, padded_length

IGNORE_INDEX = -100
Example = dict[str, list[int]]
Masking = Literal["assistant", "last_assistant", "all"]
MASKING = ("assistant", "last_assistant", "all")
_WARNED: set[tuple[str, str | None]] = set()


class EmptyLabelsError(ValueError):
    """A conversation that would contribute nothing to the loss (every label is ignored)."""


@dataclass(frozen=True)
class Rendered:
    """A conversation's render, its tokens and where its replies sit.

    Attributes:
        text: The template's text.
        input_ids: Its tokens, plus ``appended``.
        offsets: Character ``(start, end)`` of each token of ``text``.
        spans: The located replies (character offsets into ``text``).
        appended: The stop token(s) appended after the final reply when its template writes no stop marker
            (see :func:`~lightning_ft.data.labels.appended_stop`), else empty.
    """

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    spans: list[ReplySpan]
    appended: tuple[int, ...] = ()


def is_trained_message(message: Mapping[str, Any]) -> bool:
    """False for an assistant message opted out with ``"train": false`` or ``"weight": 0``."""
    return message.get("train", True) is not False and message.get("weight", 1) != 0


def _warn_once(key: tuple[str, str | None], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def render_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, chat_template: str | None = None,
                        stop_tokens: Sequence[int | str] | None = None, train_reasoning: bool = True) -> Rendered:
    """Render, tokenise and locate every reply with its stop marker (see :func:`encode_conversation`)."""
    text = render_text(tokenizer, messages, chat_template)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _rendered(messages, text, encoded["input_ids"], encoded["offset_mapping"], tokenizer, chat_template,
                     stop_texts(tokenizer, stop_tokens), train_reasoning, appended_stop(tokenizer, stop_tokens))


def _rendered(messages: Sequence[Mapping[str, Any]], text: str, ids: Sequence[int],
              offsets: Sequence[Sequence[int]], tokenizer: Any, chat_template: str | None, stops: Sequence[str],
              train_reasoning: bool, stop_ids: Sequence[int], traits: TemplateTraits | None = None) -> Rendered:
    """A :class:`Rendered` from the template's text and its tokens (one conversation of a batch, or alone);
    ``stop_ids``: what to append when the final reply has no stop marker; ``traits``: the template's, when the
    caller already learned them (once per batch, not per conversation)."""
    ids = list(ids)
    # A fast tokenizer's offsets are already a list of tuples: copied only when they come in another shape.
    if not isinstance(offsets, list) or (offsets and not isinstance(offsets[0], tuple)):
        offsets = [tuple(pair) for pair in offsets]
    traits = traits if traits is not None else template_traits(tokenizer, chat_template)
    spans = locate_replies(text, messages, traits, stops, train_reasoning)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    appended: tuple[int, ...] = ()
    if spans and spans[-1].message == len(messages) - 1 and not spans[-1].stopped:
        if not stop_ids:
            raise ValueError("the chat template writes no stop marker after the final reply and there is no stop "
                             "token to append (no eos, no `data.stop_tokens`): set `data.chat_template` to one "
                             "that ends replies, or `data.stop_tokens`")
        appended = tuple(stop_ids)
        _warn_once(("eos", template), "The chat template writes no stop marker after the final reply: a stop token "
                   f"({tokenizer.decode(list(appended))!r}) is appended to every conversation and trained, so the "
                   "model learns to stop.")
        ids.extend(appended)
    if any(not span.stopped for span in spans[:-1]):
        _warn_once(("mid", template), "The chat template writes no stop token (of the model's generation config "
                   "or the tokenizer's eos) after replies other than the last: those replies are trained without "
                   "a stop marker. Pass the model's stop tokens (`stop_tokens`) if it has more than one.")
    return Rendered(text, ids, offsets, spans, appended)


def _token_range(rendered: Rendered, start: int, end: int, starts: Sequence[int] | None = None,
                 ends: Sequence[int] | None = None) -> tuple[int, int]:
    """Tokens ``[first, stop)`` covering characters ``[start, end)``.

    Every token that overlaps the span is trained, one that straddles either edge too (a BPE merge of header
    and reply, ``"\\n  "``, or of a stop marker the tokenizer splits and the next header, ``"><"``): every
    character of a reply and of its stop marker is a target, so the model learns to write the marker whole.
    ``starts``/``ends`` are the offsets' columns, when the caller already split them (once per conversation
    rather than once per reply).
    """
    starts = [s for s, _ in rendered.offsets] if starts is None else starts
    ends = [e for _, e in rendered.offsets] if ends is None else ends
    return bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)


def count_trained(labels: Sequence[int]) -> int:
    """How many labels take part in the loss."""
    if isinstance(labels, list):
        return len(labels) - labels.count(IGNORE_INDEX)  # C speed: this runs on every encoded conversation
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
                        chat_template: str | None = None, stop_tokens: Sequence[int | str] | None = None,
                        masking: Masking = "assistant", train_reasoning: bool = True) -> Example:
    """Tokenise a conversation with its chat template and label the replies with their stop markers.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``: optional system message, then user and
            assistant alternating, ending with the assistant. An assistant message with ``"train": false``
            or ``"weight": 0`` is not trained.
        tokenizer: A Hugging Face (fast) tokenizer with a chat template.
        max_length: Keep only the first ``max_length`` tokens.
        chat_template: A Jinja template overriding the tokenizer's.
        stop_tokens: Token ids or strings that end a reply: the model's ``generation_config.eos_token_id``
            (a list for many families). The tokenizer's eos always counts; ``None`` means it alone.
        masking: ``assistant`` trains every assistant reply, ``last_assistant`` only the final one, ``all``
            every token (the opted-out replies excepted).
        train_reasoning: Train ``<think>`` reasoning inside a reply where the template renders it (templates
            that strip it from earlier turns leave nothing to train there); ``False`` trains the answers only.

    Returns:
        ``input_ids`` exactly as ``apply_chat_template`` produces them (plus an eos token when the template
        writes no stop marker after the final reply: a warning says so once), and ``labels`` aligned with
        them (the model shifts internally): ``-100`` except on the trained replies and their stop markers.

    Raises:
        ValueError: The conversation breaks the ordering rules, or ``masking`` is unknown.
        TemplateRefusedError: The template raised on the conversation (its message and what to change).
        EmptyLabelsError: No token is trained, e.g. truncation removed every trained token.

    Example:
        >>> example = encode_conversation(
        ...     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)
        >>> tokenizer.decode([t for t in example["labels"] if t != -100])
        'Hello!<|im_end|>'
    """
    if masking not in MASKING:
        raise ValueError(f"masking={masking!r} is not one of: {', '.join(MASKING)}")
    problems = check_conversation(messages)
    if problems:
        raise ValueError("Invalid conversation: " + "; ".join(problems))
    rendered = render_conversation(messages, tokenizer, chat_template, stop_tokens, train_reasoning)
    full = example = _labelled(messages, rendered, masking)
    if max_length is not None:
        example = truncate_example(full, max_length, "cut")
        if not count_trained(example["labels"]):
            first = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
            raise EmptyLabelsError(
                f"conversation yields no trained token after truncation to max_length={max_length}: "
                f"its first trained token is at position {first}"
            )
    return example


def _labelled(messages: Sequence[Mapping[str, Any]], rendered: Rendered, masking: Masking) -> Example:
    """``input_ids`` and ``labels`` of a rendered conversation; raises :class:`EmptyLabelsError` when none is trained."""
    ids = rendered.input_ids
    labels = list(ids) if masking == "all" else [IGNORE_INDEX] * len(ids)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    starts, ends = [s for s, _ in rendered.offsets], [e for _, e in rendered.offsets]
    for span in rendered.spans:
        first, stop = _token_range(rendered, span.start, span.end, starts, ends)
        if span.message == last and rendered.appended:
            stop = len(ids)  # through the appended stop
        if not is_trained_message(messages[span.message]):
            labels[first:stop] = [IGNORE_INDEX] * (stop - first)
        elif masking == "assistant" or span.message == last:
            labels[first:stop] = ids[first:stop]
    if not count_trained(labels):
        raise EmptyLabelsError("conversation yields no trained token: the chat template renders no assistant reply "
                               "verbatim, or every reply is opted out (train: false / weight: 0)")
    return {"input_ids": ids, "labels": labels}


def encode_conversations(conversations: Sequence[Sequence[Mapping[str, Any]]], tokenizer: Any,
                         chat_template: str | None = None, stop_tokens: Sequence[int | str] | None = None,
                         masking: Masking = "assistant", train_reasoning: bool = True) -> list[Example | ValueError]:
    """:func:`encode_conversation` on many conversations at once, with the same result for each.

    The templates are rendered in one call (:func:`~lightning_ft.data.labels.render_plain`) and the texts
    tokenised in one batched call of the fast tokenizer (its per-call overhead is most of the cost of short
    conversations); a template that refuses one conversation is then rendered one by one, so only that one fails.

    Returns:
        Per conversation, its example, or the error :func:`encode_conversation` would raise
        (``ValueError``: bad order, :class:`TemplateRefusedError`, :class:`EmptyLabelsError`).
    """
    if masking not in MASKING:
        raise ValueError(f"masking={masking!r} is not one of: {', '.join(MASKING)}")
    results: list[Example | ValueError | None] = [None] * len(conversations)
    for index, messages in enumerate(conversations):
        if problems := check_conversation(messages):
            results[index] = ValueError("Invalid conversation: " + "; ".join(problems))
    todo = [i for i, result in enumerate(results) if result is None]
    texts = render_texts([conversations[i] for i in todo], tokenizer, chat_template)
    for i, text in zip(todo, texts):
        if isinstance(text, ValueError):
            results[i] = text
    todo = [(i, text) for i, text in zip(todo, texts) if isinstance(text, str)]
    encoded = tokenizer([text for _, text in todo], add_special_tokens=False, return_offsets_mapping=True)
    stops, stop_ids, traits = stop_texts(tokenizer, stop_tokens), appended_stop(tokenizer, stop_tokens), None
    for (i, text), ids, offsets in zip(todo, encoded["input_ids"], encoded["offset_mapping"]):
        try:
            if traits is None:
                traits = template_traits(tokenizer, chat_template)
            rendered = _rendered(conversations[i], text, ids, offsets, tokenizer, chat_template, stops,
                                 train_reasoning, stop_ids, traits)
            results[i] = _labelled(conversations[i], rendered, masking)
        except ValueError as error:
            results[i] = error
    return results  # type: ignore[return-value]


def render_texts(conversations: Sequence[Sequence[Mapping[str, Any]]], tokenizer: Any,
                chat_template: str | None) -> list[str | ValueError]:
    """Every conversation's render (one call of the template for the batch), or its :class:`TemplateRefusedError`."""
    if not conversations:
        return []
    try:
        return render_plain(tokenizer, conversations, chat_template)
    except Exception:  # noqa: BLE001 - some conversation is refused: find which, one at a time
        pass
    texts: list[str | ValueError] = []
    for messages in conversations:
        try:
            texts.append(render_text(tokenizer, messages, chat_template))
        except TemplateRefusedError as error:
            texts.append(error)
    return texts


def mark_trained(example: Example, tokenizer: Any) -> str:
    """The example's text with every trained run of tokens wrapped in ``[[...]]`` (for ``check-data``)."""
    parts, run, trained = [], [], None
    for token, label in [*zip(example["input_ids"], example["labels"]), (None, None)]:
        flag = label != IGNORE_INDEX
        if (flag != trained or token is None) and run:
            text = tokenizer.decode(run)
            parts.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(token)
        trained = flag
    return "".join(parts)


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
    input_ids, attention_mask = pad([example["input_ids"] for example in examples], pad_token_id,
                                    pad_to_multiple_of=pad_to_multiple_of)
    labels, _ = pad([example["labels"] for example in examples], IGNORE_INDEX, length=input_ids.shape[1])
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
    length = padded_length(max(len(row) for row in ids), pad_to_multiple_of)
    for r in range(len(rows)):
        fill = length - len(ids[r])
        ids[r] += [pad_token_id] * fill
        labels[r] += [IGNORE_INDEX] * fill
        positions[r] += range(fill)
        if marked:
            replay[r] += [False] * fill
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
