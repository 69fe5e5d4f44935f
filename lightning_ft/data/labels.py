"""Where each assistant reply and the stop marker after it sit inside the full render of a conversation.

The full render is the single truth: nothing assumes that a template renders a prefix of a conversation
as a prefix of the whole (templates that strip reasoning from earlier turns, fold the system prompt into
the last user turn, or end the last turn differently all break that). Instead each reply is searched for,
in order, inside the rendered text, and the text after it is read up to the first stop marker:

- a stop token (the model's ``generation_config.eos_token_id`` and the tokenizer's eos) written before
  the next message's content, even when it is the next turn's role tag (GLM-style ``<|user|>``);
- or the end-of-turn text the template writes after a reply, learned once per template from a render of
  a sentinel conversation (e.g. ``<|im_end|>``, ``<|eot_id|>``, gpt-oss's ``<|end|>`` between turns).

Text after that marker (a newline, the next turn's header) is never part of the reply's span.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Plain words no template rewrites; their positions in the sentinel render reveal the template's layout.
_SENTINELS = ("qzsentuserone", "qzsentreplyone", "qzsentusertwo", "qzsentreplytwo")
_TRAITS: dict[tuple, TemplateTraits] = {}
#: Per template: whether ``render_jinja_template`` alone renders what ``apply_chat_template`` does.
_DIRECT_RENDER: dict[tuple, bool] = {}
try:
    from transformers.utils.chat_template_utils import render_jinja_template as _render_jinja
except ImportError:  # pragma: no cover - older or newer transformers: apply_chat_template does it all
    _render_jinja = None


class TemplateRefusedError(ValueError):
    """The chat template itself raised on a conversation (e.g. it has no system role)."""


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template writes around an assistant reply, learned from a sentinel render.

    Attributes:
        generation_prompt: The text ``add_generation_prompt=True`` appends (the assistant header), or
            ``None`` when the template writes none or could not be rendered.
        end_marker: The end-of-turn text after a reply (whitespace stripped), ``""`` when it writes none.
        user_header: The text right before a later user turn's content (``""`` when unknown).
        reply_preamble: The text between a user turn's content and the reply, the same in every turn.
        system_first: Whether a system message is rendered before the first user turn.
        special_tokens: The tokenizer's special tokens, e.g. role tags.
        reply_preambles: The whole text between a user turn's content and the reply, for an earlier and for the
            final turn (which may differ, e.g. an empty reasoning block), longest first: where it matches, the
            reply's rendered text starts right after it, so whitespace at the reply's start is told apart from
            the template's.
    """

    generation_prompt: str | None
    end_marker: str
    user_header: str = ""
    reply_preamble: str = ""
    system_first: bool = False
    special_tokens: tuple[str, ...] = ()
    reply_preambles: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplySpan:
    """One assistant reply located in the rendered text (character offsets).

    Attributes:
        message: Index of the assistant message in the conversation.
        start: First character to train (the reply, or the reasoning before it).
        end: One past the last character to train: the end of the stop marker when ``stopped``.
        stopped: Whether a stop marker was found after the reply.
    """

    message: int
    start: int
    end: int
    stopped: bool


def render_plain(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, Any]]], chat_template: str | None,
                 add_generation_prompt: bool = False) -> list[str]:
    """The template's text for each conversation (role and content only), exactly as ``apply_chat_template``
    renders it; raises what the template raises.

    ``apply_chat_template(tokenize=False)`` normalises every message (message objects to dicts, ``None`` values
    dropped), then calls transformers' ``render_jinja_template`` with the tokenizer's special tokens. The messages
    here are fresh dicts of two strings, which that normalising returns unchanged, so they go to
    ``render_jinja_template`` directly: a fifth of the render's time on short conversations. Whether that gives
    ``apply_chat_template``'s text is checked on the first conversation rendered with each template (per
    process); where it does not (another transformers version), ``apply_chat_template`` renders everything.
    """
    plain = [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in conversations]
    if not plain:
        return []

    def reference(chats: list) -> list[str]:
        return list(tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  chat_template=chat_template))

    if _render_jinja is None or not hasattr(tokenizer, "get_chat_template"):
        return reference(plain)
    template, specials = tokenizer.get_chat_template(chat_template), tokenizer.special_tokens_map

    def direct(chats: list) -> list[str]:
        return list(_render_jinja(conversations=chats, chat_template=template,
                                  add_generation_prompt=add_generation_prompt, **specials)[0])

    key = (template, add_generation_prompt, repr(sorted(specials.items())))
    if key not in _DIRECT_RENDER:
        expected = reference(plain[:1])  # a template that refuses this conversation raises here
        try:
            _DIRECT_RENDER[key] = direct(plain[:1]) == expected
        except Exception:  # noqa: BLE001 - another signature or behaviour: keep to apply_chat_template
            _DIRECT_RENDER[key] = False
    return direct(plain) if _DIRECT_RENDER[key] else reference(plain)


def render_text(tokenizer: Any, messages: Sequence[Mapping[str, Any]], chat_template: str | None,
                add_generation_prompt: bool = False) -> str:
    """The template's text for ``messages`` (role and content only), exactly as ``apply_chat_template`` renders it.

    Raises:
        TemplateRefusedError: The template raised; its own message is kept.
    """
    try:
        return render_plain(tokenizer, [messages], chat_template, add_generation_prompt)[0]
    except Exception as error:  # noqa: BLE001 - jinja's TemplateError, raise_exception, a missing variable...
        hint = ("set `data.system_prompt: null` and drop the system message from the data, or "
                if any(m["role"] == "system" for m in messages) else "")
        raise TemplateRefusedError(f"the chat template refuses this conversation: {error}. To train on it, {hint}"
                                   "set `data.chat_template` to a template that accepts it") from error


def _common_token_prefix(tokenizer: Any, first: str, second: str, reverse: bool = False) -> str:
    # Token level, so "<|end|>\n<|user|>" and "<|end|>\n<|assistant|>" share "<|end|>\n", not "<|end|>\n<|".
    a = tokenizer(first, add_special_tokens=False)["input_ids"]
    b = tokenizer(second, add_special_tokens=False)["input_ids"]
    if reverse:
        a, b = a[::-1], b[::-1]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return tokenizer.decode(a[:common][::-1] if reverse else a[:common]) if common else ""


def _header_at(text: str, header: str | None) -> int:
    """Where the longest leading part of the assistant header occurs in ``text`` (-1: nowhere).

    A generation prompt may hold more than a finished turn (R1's or Nemotron's ``<think>``).
    """
    for size in range(len(header or ""), 2, -1):
        found = text.find(header[:size])
        if found >= 0 and header[:size].strip():
            return found
    return -1


def _renders_system_first(tokenizer: Any, chat_template: str | None, conversation: list[dict[str, str]]) -> bool:
    system = "qzsentsystem"
    try:
        text = render_text(tokenizer, [{"role": "system", "content": system}, *conversation], chat_template)
    except TemplateRefusedError:
        return False
    return 0 <= text.find(system) < text.find(conversation[0]["content"])


def _balanced(text: str) -> str:
    """The longest prefix of ``text`` that leaves no bracket open: the text two turn endings share may stop
    inside a marker (``"<|end|>"`` and ``"<|endoftext|>"`` share ``"<|end"``), and half a marker is none."""
    depth, cut = 0, 0
    for index, char in enumerate(text):
        depth += (char in "<[") - (char in ">]")
        if depth <= 0:
            depth, cut = 0, index + 1
    return text[:cut]


def _end_marker(tokenizer: Any, full: str, positions: list[int], header: str | None) -> tuple[str, str]:
    """The end-of-turn text after a reply and the user header after it, from the sentinel render."""
    after_mid = full[positions[1] + len(_SENTINELS[1]): positions[2]]
    after_final = full[positions[3] + len(_SENTINELS[3]):]
    user_header = _common_token_prefix(tokenizer, full[: positions[0]], after_mid, reverse=True)
    # Most templates end every turn alike: the user's end marker is what precedes the assistant header.
    between = full[positions[2] + len(_SENTINELS[2]): positions[3]]
    cut = _header_at(between, header)
    user_end = between[:cut].strip() if cut > 0 else ""
    found = after_mid.find(user_end) if user_end else -1
    if found >= 0:  # e.g. "<|im_end|>", or Command-R7B's "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
        marker = after_mid[: found + len(user_end)].strip()
    else:  # what follows every reply, the final one too, short of the next user turn's header
        ending = after_mid[: len(after_mid) - len(user_header)]
        # Where nothing but the next user header follows a reply and the template writes it after the final
        # reply too (a GLM-style role tag), that header is how a reply ends.
        marker = (_balanced(os.path.commonprefix([ending, after_final])).strip()
                  or _balanced(os.path.commonprefix([after_mid, after_final])).strip())
    # The header proper starts after the previous turn's end marker (the suffix above may hold both).
    for end in (marker, tokenizer.eos_token):
        if end and end.strip() and end in after_mid:
            return marker, after_mid[after_mid.index(end) + len(end):]
    return marker, user_header


def _learn_traits(tokenizer: Any, chat_template: str | None) -> TemplateTraits:
    user1, reply1, user2, reply2 = _SENTINELS
    conversation = [{"role": "user", "content": user1}, {"role": "assistant", "content": reply1},
                    {"role": "user", "content": user2}, {"role": "assistant", "content": reply2}]
    try:
        full = render_text(tokenizer, conversation, chat_template)
        prompt = render_text(tokenizer, conversation[:3], chat_template, add_generation_prompt=True)
        bare = render_text(tokenizer, conversation[:3], chat_template)
    except TemplateRefusedError:
        return TemplateTraits(None, "")
    positions = [full.find(word) for word in _SENTINELS]
    if min(positions) < 0 or positions != sorted(positions):
        return TemplateTraits(None, "")
    header = prompt[len(bare):] if prompt.startswith(bare) and len(prompt) > len(bare) else None
    marker, user_header = _end_marker(tokenizer, full, positions, header)
    betweens = (full[positions[0] + len(user1): positions[1]], full[positions[2] + len(user2): positions[3]])
    return TemplateTraits(header, marker, user_header, os.path.commonprefix(list(betweens)),
                          _renders_system_first(tokenizer, chat_template, conversation),
                          reply_preambles=tuple(sorted(set(betweens), key=len, reverse=True)))


def template_traits(tokenizer: Any, chat_template: str | None) -> TemplateTraits:
    """:class:`TemplateTraits` of a template with a tokenizer's special tokens (learned once per process)."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    key = (template, getattr(tokenizer, "name_or_path", None), tokenizer.bos_token, tokenizer.eos_token,
           len(tokenizer), os.getpid())
    if key not in _TRAITS:
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        specials = tuple(token.content for token in decoder.values() if getattr(token, "special", False))
        _TRAITS[key] = replace(_learn_traits(tokenizer, chat_template), special_tokens=specials)
    return _TRAITS[key]


def stop_texts(tokenizer: Any, stop_tokens: Sequence[int | str] | None) -> tuple[str, ...]:
    """The text of every stop token: ``stop_tokens`` (ids or strings) plus the tokenizer's eos."""
    texts = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in stop_tokens or ():
        if isinstance(token, str):
            texts.append(token)
        elif 0 <= token < len(tokenizer):  # a generation config may name ids of another vocabulary
            texts.append(tokenizer.decode([token]))
    return tuple(dict.fromkeys(text for text in texts if text and text.strip()))


def appended_stop(tokenizer: Any, stop_tokens: Sequence[int | str] | None) -> list[int]:
    """The tokens appended after a final reply the template ends with no stop marker: the first of the given
    ``stop_tokens`` (the model's generation config, or ``data.stop_tokens``) the tokenizer knows, else its eos.
    A stop given as text that is no single token of this tokenizer is appended as its tokens."""
    for token in stop_tokens or ():
        if isinstance(token, str) and token.strip():
            ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
            if ids and tokenizer.decode(ids) == token:
                return ids
        if isinstance(token, int) and 0 <= token < len(tokenizer):
            return [token]
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _with_edges(text: str, content: str, start: int, end: int, floors: Sequence[int]) -> tuple[int, int]:
    """``(start, end)`` widened over the whitespace at the content's edges that the template renders.

    A template that writes the content as it is keeps its leading spaces and newlines: they sit between the
    end of the reply's preamble (``floors``: where the template's own text before the reply may end) and the
    first non-space character. The first floor from which everything up to ``start`` is the content's leading
    whitespace is the reply's start; a template that trims leaves nothing there. Trailing whitespace is taken
    where the render continues with exactly the content's.
    """
    lead = content[: len(content) - len(content.lstrip())]
    for floor in floors:
        if floor <= start and lead.endswith(text[floor:start]):
            start = floor
            break
    trail = content[len(content.rstrip()):]
    if trail and text.startswith(trail, end):
        end += len(trail)
    return start, end


def _locate_reply(text: str, content: str, cursor: int, train_reasoning: bool, reasoning_opener: bool,
                  ) -> tuple[int, int] | None:
    """``(start, end)`` of a reply's trained text at or after ``cursor``, or ``None`` when it is not rendered."""
    body = content.strip()
    answer = content.split(THINK_CLOSE)[-1].strip() if THINK_CLOSE in content else body
    reasoning = content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1].strip() if THINK_CLOSE in content else ""
    found = text.find(body, cursor)
    if found >= 0:  # rendered verbatim (templates that know nothing of reasoning)
        if not train_reasoning and answer:
            return found + body.rfind(answer), found + len(body)
        if reasoning and not reasoning_opener and body.startswith(THINK_OPEN):
            return found + body.find(reasoning), found + len(body)  # the generation prompt opens the block
        return found, found + len(body)
    if THINK_CLOSE not in content or not answer:
        return None
    end_hint = text.find(answer, cursor)
    if end_hint < 0:
        return None
    thought = text.find(reasoning, cursor, end_hint + len(answer)) if reasoning else -1
    if thought < 0:  # reasoning stripped from this turn by the template: train what it renders
        return end_hint, end_hint + len(answer)
    found = text.find(answer, thought + len(reasoning))
    if found < 0:
        return None
    if not train_reasoning:
        return found, found + len(answer)
    opener = text.rfind(THINK_OPEN, cursor, thought)
    # The model writes the opening tag itself unless the generation prompt already holds it (R1-style).
    if reasoning_opener and opener >= 0 and not text[opener + len(THINK_OPEN): thought].strip():
        return opener, found + len(answer)
    return thought, found + len(answer)


def _stop_end(text: str, end: int, limit: int, stops: Sequence[str], traits: TemplateTraits,
              between_turns: bool) -> int | None:
    """Where the first stop marker after a reply ends (before ``limit``), or ``None`` when there is none.

    With no stop token and no end-of-turn text, a special token that opens the next turn (GLM's
    ``<|user|>``) is the signal the model stops with: the template writes nothing else between turns.
    """
    region = text[end:limit]
    found = [(at, at + len(stop)) for stop in stops if (at := region.find(stop)) >= 0]
    candidates = [stop_end for _, stop_end in found]
    lead = len(region) - len(region.lstrip())
    if traits.end_marker and region[lead:].startswith(traits.end_marker):
        candidates.append(lead + len(traits.end_marker))
    if not candidates and between_turns:
        candidates = [lead + len(tag) for tag in traits.special_tokens if region[lead:].startswith(tag)][:1]
    if not candidates:
        return None
    first = min(candidates)
    # A stop token that the end-of-turn text runs into is trained whole (Command-R's <|END_RESPONSE|> before
    # its stop <|END_OF_TURN_TOKEN|>, the end-of-turn text of a tokenizer that writes the stop as plain text).
    return end + max([first, *(stop_end for at, stop_end in found if at < first)])


def locate_replies(text: str, messages: Sequence[Mapping[str, Any]], traits: TemplateTraits,
                   stops: Sequence[str], train_reasoning: bool = True) -> list[ReplySpan]:
    """Every assistant reply rendered in ``text``, in order, with the stop marker after it.

    Each reply is searched after the previous reply and after its own user turn's content, so a system
    prompt or an earlier turn that repeats the reply's text is never taken for it. Replies the template
    does not render (or rewrites beyond recognition) are left out.

    Args:
        text: The full render of ``messages``.
        messages: The conversation.
        traits: The template's :class:`TemplateTraits`.
        stops: Stop token texts (see :func:`stop_texts`).
        train_reasoning: Whether ``<think>`` reasoning the template renders inside a reply is trained.
    """
    opener = not (traits.generation_prompt or "").rstrip().endswith(THINK_OPEN)
    spans, cursor = [], 0
    if messages and messages[0]["role"] == "system" and traits.system_first:
        found = text.find(messages[0]["content"].strip())
        cursor = found + len(messages[0]["content"].strip()) if found >= 0 else 0
    user_end: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] == "user":
            content = message["content"]
            found = _find_user(text, content.strip(), cursor, traits)
            cursor = cursor if found < 0 else found + len(content.strip())
            trail = content[len(content.rstrip()):]
            user_end = [cursor] if found < 0 or not text.startswith(trail, cursor) else [cursor + len(trail), cursor]
            continue
        if message["role"] != "assistant":
            continue  # a system prompt may be rendered anywhere (some templates fold it into the last user turn)
        floors = [at + len(pre) for pre in traits.reply_preambles for at in user_end if text.startswith(pre, at)]
        if traits.reply_preamble and text.startswith(traits.reply_preamble, cursor):
            cursor += len(traits.reply_preamble)
        located = _locate_reply(text, message["content"], cursor, train_reasoning, opener)
        if located is None:
            continue
        start, end = _with_edges(text, message["content"], *located, [*floors, cursor])
        following = messages[index + 1]["content"].strip() if index + 1 < len(messages) else None
        limit = _find_user(text, following, end, traits) if following else -1
        limit = len(text) if limit < 0 else limit
        stop = _stop_end(text, end, limit, stops, traits, following is not None)
        if stop is None and following is None and not text[end:].strip():
            stop_at, stopped = len(text), False  # trailing whitespace joins the reply before the appended eos
        else:
            stop_at, stopped = (stop, True) if stop is not None else (end, False)
        spans.append(ReplySpan(index, start, stop_at, stopped))
        cursor = stop_at
    return spans


def _find_user(text: str, content: str, cursor: int, traits: TemplateTraits) -> int:
    """Where a user turn's content starts in ``text`` at or after ``cursor`` (-1 when it is not rendered).

    The content preceded by the template's user header is preferred, so text that merely repeats it
    earlier (a system prompt, a template's preamble) is skipped, unless an assistant turn lies in between.
    """
    plain = text.find(content, cursor)
    if plain < 0:
        return -1
    headed = text.find(traits.user_header + content, cursor) if traits.user_header.strip() else -1
    if headed >= 0 and not (traits.reply_preamble and traits.reply_preamble in text[plain:headed]):
        return headed + len(traits.user_header)
    return plain
