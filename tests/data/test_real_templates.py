"""A regression net of real chat templates: every template shipped inside an installed package (TRL bundles
several dozen of model families' templates; they are read from site-packages at test time, never copied here),
rendered with edge-case replies, checked against a character-level reference written apart from ``labels.py``.

The reference classifies each character of the render by what the template does with the content, found by
rendering the conversation again with one reply changed (every non-space character replaced, or its edges
stripped) and diffing: the characters that change are the reply as the template renders it. After a reply,
the first stop text (the tokenizer's eos or one of the family's stop tokens) before the next message is the
stop marker the model must emit; without one, the end-of-turn marker the template writes after every reply. Then every token is checked:

- a token that overlaps a reply character or the stop marker (or anything between them) is trained;
- a token made only of other characters (system, user, headers, text after the marker) is not;
- the input ids are the template's own tokenisation, plus only stop tokens appended.

Each template runs twice: with its markers as special tokens of the tokenizer (as the model's own tokenizer
has them) and with the markers split into many tokens (a template used with another family's tokenizer),
and each time with and without the family's stop tokens given.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest

from lightning_ft.data.collate import IGNORE_INDEX, EmptyLabelsError, encode_conversation
from lightning_ft.data.labels import TemplateRefusedError


def _installed_templates() -> dict[str, str]:
    try:
        import trl
    except ImportError:  # pragma: no cover - trl is a dev dependency
        return {}
    folder = Path(trl.__file__).parent / "chat_templates"
    return {path.stem: path.read_text() for path in sorted(folder.glob("*.jinja"))}


TEMPLATES = _installed_templates()
# Our own, each reproducing a layout of a family TRL ships no template for (written here, not copied).
OWN = {
    # Vicuna-style plain text, the eos written as text after each reply.
    "plain-eos-text": "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} "
                      "{% elif m.role == 'assistant' %}ASSISTANT: {{ m.content }}</s>{% else %}{{ m.content }} "
                      "{% endif %}{% endfor %}",
    # Llama-2/Mistral-style: [INST] turns, content trimmed, " </s>" after a reply.
    "inst-trim": "{% for m in messages %}{% if m.role == 'user' %}<s>[INST] {{ m.content | trim }} [/INST]"
                 "{% elif m.role == 'assistant' %} {{ m.content | trim }} </s>{% endif %}{% endfor %}",
    # Granite-style role markers, the reply closed by the end-of-text marker.
    "role-markers": "{% for m in messages %}<|start_of_role|>{{ m.role }}<|end_of_role|>{{ m.content }}"
                    "<|end_of_text|>\n{% endfor %}",
    # DeepSeek-Coder-style: instruction/response headings, a newline then the end-of-turn marker.
    "headings-eot": "{% for m in messages %}{% if m.role == 'user' %}### Instruction:\n{{ m.content }}\n"
                    "{% elif m.role == 'assistant' %}### Response:\n{{ m.content }}\n<|EOT|>\n"
                    "{% else %}{{ m.content }}\n\n{% endif %}{% endfor %}",
    # Command-R-style: two markers back to back, the second the one generation stops on.
    "two-markers": "{% for m in messages %}<|START_OF_TURN_TOKEN|><|{{ m.role | upper }}_TOKEN|>"
                   "{% if m.role == 'assistant' %}<|START_RESPONSE|>{{ m.content }}<|END_RESPONSE|>"
                   "{% else %}{{ m.content }}{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}",
    # Apertus-style: nothing written after the final reply; the family stops on its own token.
    "no-final-stop": "{% for m in messages %}<|{{ m.role }}_start|>{{ m.content }}{% if m.role != 'assistant' %}"
                     "<|{{ m.role }}_end|>{% elif not loop.last %}<|assistant_end|>{% endif %}{% endfor %}",
}
# Replies nobody formats for a tokenizer: whitespace at both ends, code, unicode, repeats of the prompt.
EDGES = [
    [{"role": "user", "content": "List two items."},
     {"role": "assistant", "content": "  \n- item one\n  - sub item\n\n"}],
    [{"role": "system", "content": "You write Python."},
     {"role": "user", "content": "Print hi."},
     {"role": "assistant", "content": "\n```python\nprint('hi')\n```\n  "},
     {"role": "user", "content": "  And bye? "},
     {"role": "assistant", "content": " print('bye') "}],
    [{"role": "user", "content": "Say ok. ok"},
     {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "Again."},
     {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "Once more, café ☕?"},
     {"role": "assistant", "content": "Oui, café ☕ — ok.\n"}],
    [{"role": "user", "content": "Sum 2+2"},
     {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
     {"role": "user", "content": "Sum 3+3"},
     {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6\n"}],
]
# Marker-looking texts of a template: <|eot_id|>, <｜end▁of▁sentence｜>, <|turn>, <turn|>, </s>, <end_of_turn>, [/INST].
MARKER = re.compile(r"<[|｜]?/?[A-Za-z_▁|｜]{1,40}[|｜]?>|\[/?[A-Z_]{3,20}\]")


def _markers(template: str) -> list[str]:
    return sorted(set(MARKER.findall(template)))


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _changed(messages, index: int, content: str) -> list[dict]:
    return [{**m, "content": content} if i == index else m for i, m in enumerate(messages)]


def _diff(text: str, other: str) -> tuple[int, int] | None:
    prefix = len(os.path.commonprefix([text, other]))
    suffix = len(os.path.commonprefix([text[prefix:][::-1], other[prefix:][::-1]]))
    return (prefix, len(text) - suffix) if len(text) - suffix > prefix else None


def _masked(content: str) -> str:
    """Every non-space character of the content replaced; reasoning tags kept (templates branch on them)."""
    parts = re.split(r"(</?think>)", content)
    return "".join(p if p in ("<think>", "</think>") else re.sub(r"\S", lambda m: "☃" if m[0] != "☃" else "☄", p)
                   for p in parts)


def _message_regions(tokenizer, messages, text: str) -> list[tuple[int, int] | None]:
    regions = []
    for index, message in enumerate(messages):
        found = [_diff(text, _render(tokenizer, _changed(messages, index, _masked(message["content"]))))]
        if message["content"] != message["content"].strip():
            found.append(_diff(text, _render(tokenizer, _changed(messages, index, message["content"].strip()))))
        found = [region for region in found if region]
        regions.append((min(a for a, _ in found), max(b for _, b in found)) if found else None)
    return regions


def _marker_run(gap: str) -> list[int]:
    """The ends of the markers written back to back at the start of ``gap`` (after whitespace)."""
    ends, at = [], len(gap) - len(gap.lstrip())
    while (marker := MARKER.match(gap, at)) is not None:
        ends.append(at := marker.end())
    return ends


def _turn_end(tokenizer) -> str | None:
    """The marker the template writes right after the final reply, e.g. <|im_end|> (None: it writes none)."""
    text = _render(tokenizer, EDGES[0])
    tail = text[text.find("sub item") + len("sub item"):]
    ends = _marker_run(tail)
    return tail[:ends[0]].strip() if ends else None


def reference(tokenizer, messages, stops: list[str]) -> tuple[str, list[tuple[int, int, int, int, int]]]:
    """The render and, per rendered reply, ``(start, end, stop_end, opener, allowed_end)``: reply characters
    ``[start, end)``, the stop marker after it ending at ``stop_end`` (``end`` when there is none), where a
    reasoning tag before the reply starts (``start`` when there is none), and how far training may go.

    The stop marker is the first stop text (eos, family's stop) inside the markers written right after the
    reply, else the template's end of turn (what it writes after every reply, the final one too) when that
    follows the reply, else the first stop text further on. The markers after the reply may be trained.
    """
    text = _render(tokenizer, messages)
    regions = _message_regions(tokenizer, messages, text)
    turn_end, spans = _turn_end(tokenizer), []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or regions[index] is None:
            continue
        start, end = regions[index]
        # The tag of a reasoning block the content opens may be trained (the model writes it) or not (the
        # generation prompt holds it), also where the template writes the tag itself.
        opener = text.rfind("<think>", 0, start)
        if not ("<think>" in message["content"] and opener >= 0 and not text[opener + 7:start].strip()):
            opener = start
        later = [r[0] for r in regions[index + 1:] if r]
        limit = min(later) if later else len(text)
        found = min([text.find(stop, end, limit) + len(stop) for stop in stops if text.find(stop, end, limit) >= 0],
                    default=None)
        run = [end + e for e in _marker_run(text[end:limit])]
        if found is not None and run and found <= run[-1]:
            stop_end = found
        elif run and turn_end and text[end:run[0]].strip() == turn_end:
            stop_end = run[0]
        else:
            stop_end = found if found is not None else end
        spans.append((start, end, stop_end, opener, max([stop_end, *run])))
    return text, spans


def check_against_reference(tokenizer, messages, stop_tokens: list[str] | None) -> None:
    stops = [s for s in dict.fromkeys([tokenizer.eos_token, *(stop_tokens or [])]) if s]
    text, spans = reference(tokenizer, messages, stops)
    try:
        example = encode_conversation(messages, tokenizer, stop_tokens=stop_tokens)
    except EmptyLabelsError:
        assert not spans, f"refused, yet the template renders replies: {text!r}"
        return
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    assert example["input_ids"][:len(ids)] == ids, "input ids differ from the template's own tokenisation"
    appended = example["input_ids"][len(ids):]
    assert not appended or tokenizer.decode(appended) in stops, f"appended {appended}, not one of the stops"
    labels = example["labels"]
    trained_chars, allowed_chars = set(), set()
    for start, end, stop_end, opener, allowed_end in spans:
        trained_chars.update(range(start, end))
        allowed_chars.update(range(opener, allowed_end))
        if stop_end > end:
            trained_chars.update(range(end, stop_end))
    for position, (a, b) in enumerate(offsets):
        chars = set(range(a, b))
        shown = f"token {position} {text[a:b]!r} in {text!r}"
        if chars & trained_chars:
            assert labels[position] == ids[position], f"not trained: {shown}"
        elif chars and labels[position] != IGNORE_INDEX:
            assert chars & allowed_chars, f"trained outside the replies and stop markers: {shown}"
    final = spans[-1] if spans else None
    if final and final[2] == final[1] and not text[final[1]:].strip():  # no stop written after the last reply
        assert appended and labels[-len(appended):] == appended, "the final reply has no stop: none appended"
        assert tokenizer.decode(appended) == (stop_tokens or stops)[0], "not the first given stop appended"


def _family_stops(tokenizer, template: str) -> list[str]:
    """The family's stop token, as its generation config names it: the marker its template writes after the
    final reply, else the first end-of-turn looking marker the template knows."""
    ending = _render(tokenizer, EDGES[0])
    tail = ending[ending.find("sub item") + len("sub item"):].strip()
    head = MARKER.match(tail)
    if head:
        return [head[0]]
    ends = [m for m in _markers(template) if re.search(r"end|eot|return|</s>", m, re.I)]
    return ends[:1]


def _tokenizer(tiny_tokenizer, template: str, markers_special: bool):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if markers_special:
        tokenizer.add_special_tokens({"additional_special_tokens": _markers(template)})
    tokenizer.chat_template = template
    return tokenizer


def _family_stop_of(name: str, tokenizer, template: str) -> list[str]:
    return {"two-markers": ["<|END_OF_TURN_TOKEN|>"], "no-final-stop": ["<|assistant_end|>"]}.get(
        name, _family_stops(tokenizer, template))


@pytest.mark.parametrize("markers_special", [True, False], ids=["special-markers", "split-markers"])
@pytest.mark.parametrize("name", sorted(OWN))
def test_own_template_masks_exactly(tiny_tokenizer, name, markers_special):
    _check_template(tiny_tokenizer, name, OWN[name], markers_special)


@pytest.mark.skipif(not TEMPLATES, reason="no package ships chat templates here (trl is a dev dependency)")
@pytest.mark.parametrize("markers_special", [True, False], ids=["special-markers", "split-markers"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_installed_template_masks_exactly(tiny_tokenizer, name, markers_special):
    _check_template(tiny_tokenizer, name, TEMPLATES[name], markers_special)


def _check_template(tiny_tokenizer, name: str, template: str, markers_special: bool) -> None:
    tokenizer = _tokenizer(tiny_tokenizer, template, markers_special)
    rendered = 0
    for messages in EDGES:
        try:
            _render(tokenizer, messages)
        except Exception:  # noqa: BLE001 - the template itself refuses (no system role...): ours must refuse too
            with pytest.raises(TemplateRefusedError):
                encode_conversation(messages, tokenizer)
            continue
        rendered += 1
        for stop_tokens in (None, _family_stop_of(name, tokenizer, template)):
            check_against_reference(tokenizer, messages, stop_tokens)
    if not rendered:
        pytest.skip(f"{name}: the template renders none of these conversations (it wants another message shape)")
