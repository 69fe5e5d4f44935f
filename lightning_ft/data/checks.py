"""Dataset linting: structured findings about chat data, from bad records to duplicates and odd answers.

Every check is a function from conversations (and, for token counts, a tokenizer) to a list of
:class:`Finding`, so ``lightning_ft check-data`` reports them all and ``ChatDataModule`` reuses the
model-free ones at ``fit`` time. Nothing here raises on bad data: a problem becomes a finding.

Near-duplicates are found with an exact Jaccard similarity over word 3-grams of the normalised text
(lowercase, punctuation and whitespace collapsed), joined with prefix filtering: shingles are ordered
rarest first and two sets can only reach similarity ``t`` if their first ``|s| - ceil(t * |s|) + 1``
shingles share one. Rare shingles have short posting lists, so 10k conversations take a second or two,
with no false negatives (unlike MinHash).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pytorch_lightning.utilities import rank_zero_warn

from lightning_ft.data.collate import (
    EmptyLabelsError,
    count_trained,
    encode_conversation,
    truncate_example,
)
from lightning_ft.data.formats import ROLES, Conversation, DataError, DataProblem
from lightning_ft.data.labels import TemplateRefusedError, render_text

Severity = Literal["error", "warning", "info"]
#: Similarity (Jaccard over word 3-grams) from which two conversations count as near-duplicates.
NEAR_DUPLICATE_THRESHOLD = 0.8
#: A response shape or JSON key set shared by at least this share of answers is "the" format; others are odd.
MAJORITY = 0.7
#: Statistical checks (shapes, rare values, outlier lengths) need this many conversations to mean anything.
MIN_FOR_STATISTICS = 10

# DataProblem texts from formats.py -> finding codes (first match wins).
_PROBLEM_CODES = (
    ("file not found", "unreadable-file"), ("is a directory", "unreadable-file"),
    ("is not UTF-8", "unreadable-file"), ("cannot be read", "unreadable-file"),
    ("unsupported file type", "unreadable-file"), ("invalid JSON", "malformed-json"),
    ("no records", "empty-file"), ("cannot detect the record format", "unknown-format"),
    ("unknown role", "unknown-role"), ("unknown speaker", "unknown-role"),
    ("no assistant message", "missing-assistant"), ("last message must be from the assistant", "missing-assistant"),
    ("may only come first", "role-order"), ("message here", "role-order"),
    ("conversation is empty", "empty-message"), ("empty", "empty-message"),
    ("missing field", "missing-field"),
)


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about the data.

    Attributes:
        severity: ``error`` (training would fail or be wrong), ``warning`` (probably a data bug) or ``info``.
        code: Stable kebab-case identifier, e.g. ``malformed-json``, ``near-duplicate``, ``leakage``.
        location: ``file:line``, ``file:record N``, a file, or ``""`` for the whole dataset.
        message: What is wrong and, where it helps, what was expected.
    """

    severity: Severity
    code: str
    location: str
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{where}{self.severity} [{self.code}] {self.message}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def problem_finding(problem: DataProblem) -> Finding:
    """A record or file problem from :func:`~lightning_ft.data.formats.scan_file` as an error finding."""
    code = next((code for text, code in _PROBLEM_CODES if text in problem.message), "wrong-type")
    field = f"{problem.field}: " if problem.field else ""
    return Finding("error", code, problem.location, field + problem.message)


def enforce(findings: Sequence[Finding], checks: Literal["warn", "strict", "off"], command: str) -> None:
    """Act on a datamodule's check findings: raise on errors (and on warnings with ``strict``), else warn once.

    Args:
        findings: What the checks found; ``info`` findings are ignored.
        checks: ``warn``, ``strict`` or ``off`` (the datamodule's ``checks`` setting).
        command: The command that shows the full report, named in the warning.
    """
    findings = [f for f in findings if f.severity != "info"]
    if checks == "off" or not findings:
        return
    if checks == "strict" or any(f.severity == "error" for f in findings):
        raise DataError([str(f) for f in findings])
    shown = [str(f) for f in findings[:20]] + ([f"... and {len(findings) - 20} more"] if len(findings) > 20 else [])
    rank_zero_warn(f"Data checks found {len(findings)} warning{'s' if len(findings) != 1 else ''} "
                   f"(`{command}` with the same arguments shows the full report; "
                   "data.checks=strict stops on them):\n  " + "\n  ".join(shown))


# -- text views of a conversation -----------------------------------------------------------------
def normalize(text: str) -> str:
    """Lowercase, with runs of punctuation, symbols and whitespace collapsed to one space."""
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def _last_assistant(conversation: Conversation) -> int:
    return max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")


def prompt_text(conversation: Conversation) -> str:
    """Every non-system message before the last assistant turn."""
    end = _last_assistant(conversation)
    return "\n".join(m["content"] for m in conversation.messages[:end] if m["role"] != "system")


def answer_text(conversation: Conversation) -> str:
    """The last assistant message."""
    return conversation.messages[_last_assistant(conversation)]["content"]


def system_text(conversation: Conversation) -> str | None:
    first = conversation.messages[0]
    return first["content"] if first["role"] == "system" else None


def _shingles(text: str, size: int = 3) -> frozenset[str]:
    words = normalize(text).split()
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + size]) for i in range(len(words) - size + 1))


def similar_pairs(sets: Sequence[frozenset[str]], threshold: float,
                  others: Sequence[frozenset[str]] | None = None) -> list[tuple[int, int, float]]:
    """Pairs with Jaccard similarity >= ``threshold``, exactly, via prefix filtering.

    Args:
        sets: Shingle sets.
        threshold: In ``(0, 1]``.
        others: When given, pairs ``(i, j)`` match ``sets[i]`` with ``others[j]``; otherwise
            ``(i, j)`` with ``i < j`` within ``sets``.

    Returns:
        ``(i, j, similarity)`` sorted by ``j`` then ``i``.
    """
    frequency = Counter(token for group in (sets, others or ()) for s in group for token in s)

    def prefix(s: frozenset[str]) -> list[str]:
        ordered = sorted(s, key=lambda token: (frequency[token], token))  # rarest first
        return ordered[: len(s) - math.ceil(threshold * len(s)) + 1]

    index: dict[str, list[int]] = defaultdict(list)
    pairs = []

    def probe(j: int, s: frozenset[str]) -> None:
        candidates = {i for token in prefix(s) for i in index.get(token, ())}
        for i in sorted(candidates):
            a = sets[i]
            if min(len(a), len(s)) < threshold * max(len(a), len(s)):
                continue  # sizes too different to reach the threshold
            similarity = len(a & s) / len(a | s)
            if similarity >= threshold:
                pairs.append((i, j, similarity))

    if others is None:
        for j, s in enumerate(sets):
            if s:
                probe(j, s)
                for token in prefix(s):
                    index[token].append(j)
    else:
        for i, s in enumerate(sets):
            for token in prefix(s) if s else ():
                index[token].append(i)
        for j, s in enumerate(others):
            if s:
                probe(j, s)
    return pairs


# -- model-free checks ------------------------------------------------------------------------------
def find_duplicates(conversations: Sequence[Conversation],
                    threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Finding]:
    """Exact duplicates, the same prompt with a different answer, and near-duplicates (later copy reported)."""
    findings, reported = [], set()
    first_raw: dict[tuple, int] = {}
    first_prompt: dict[str, int] = {}
    for j, conversation in enumerate(conversations):
        raw = tuple((m["role"], m["content"]) for m in conversation.messages)
        prompt = normalize(prompt_text(conversation))
        if raw in first_raw:
            findings.append(Finding("warning", "exact-duplicate", conversation.source,
                                    f"identical to {conversations[first_raw[raw]].source}"))
            reported.add(j)
        elif prompt in first_prompt:
            i = first_prompt[prompt]
            if normalize(answer_text(conversations[i])) != normalize(answer_text(conversation)):
                findings.append(Finding("warning", "conflicting-answers", conversation.source,
                                        f"same prompt as {conversations[i].source} but a different answer: "
                                        f"{_preview(answer_text(conversation))} vs "
                                        f"{_preview(answer_text(conversations[i]))}"))
            else:
                findings.append(Finding("warning", "near-duplicate", conversation.source,
                                        f"same text as {conversations[i].source} up to case and punctuation"))
            reported.add(j)
        first_raw.setdefault(raw, j)
        first_prompt.setdefault(prompt, j)
    texts = [_shingles(prompt_text(c) + "\n" + answer_text(c)) for c in conversations]
    for i, j, similarity in similar_pairs(texts, threshold):
        if j not in reported:
            reported.add(j)
            findings.append(Finding("warning", "near-duplicate", conversations[j].source,
                                    f"{similarity:.0%} similar to {conversations[i].source}"))
    return findings


def find_leakage(train: Sequence[Conversation], held_out: Sequence[Conversation],
                 threshold: float = NEAR_DUPLICATE_THRESHOLD, name: str = "validation") -> list[Finding]:
    """Held-out conversations whose prompt is (nearly) a training prompt: their scores would be inflated."""
    train_prompts = [_shingles(prompt_text(c)) for c in train]
    held_prompts = [_shingles(prompt_text(c)) for c in held_out]
    exact = {normalize(prompt_text(c)): i for i, c in reversed(list(enumerate(train)))}
    findings, reported = [], set()
    for j, conversation in enumerate(held_out):
        i = exact.get(normalize(prompt_text(conversation)))
        if i is not None:
            reported.add(j)
            findings.append(Finding("warning", "leakage", conversation.source,
                                    f"{name} prompt also in the training data at {train[i].source}"))
    for i, j, similarity in similar_pairs(train_prompts, threshold, others=held_prompts):
        if j not in reported:
            reported.add(j)
            findings.append(Finding("warning", "leakage", held_out[j].source,
                                    f"{name} prompt {similarity:.0%} similar to training prompt at {train[i].source}"))
    return findings


def shorten(text: str, width: int, flatten: bool = True) -> str:
    """``text`` in at most ``width`` characters, ending in "…" when cut: the one way reports preview a text.

    Args:
        text: Any text (a prompt, a reply, a generation).
        width: The most characters kept, the "…" included.
        flatten: Turn every run of whitespace (newlines included) into one space first.
    """
    flat = " ".join(text.split()) if flatten else text
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _preview(text: str, width: int = 60) -> str:
    return repr(shorten(text, width))


def response_shape(text: str) -> tuple[str, tuple[str, ...] | None, str | None]:
    """Classify an answer: ``(shape, JSON object keys or None, parse error or None)``.

    Shapes: ``JSON object``, ``JSON array``, ``broken JSON`` (starts like JSON, does not parse),
    ``code block``, ``list`` (every line a bullet or number) and ``text``.
    """
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as error:
            return "broken JSON", None, f"{error.msg} at column {error.colno}"
        if isinstance(value, dict):
            return "JSON object", tuple(value), None
        return "JSON array", None, None
    if stripped.startswith("```"):
        return "code block", None, None
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) >= 2 and all(re.match(r"\s*([-*•]|\d+[.)])\s", line) for line in lines):
        return "list", None, None
    return "text", None, None


def _odd_ones(labels: Sequence[Any]) -> tuple[Any, int, list[int]]:
    """The majority label, its count, and the indices that differ (empty unless it has a clear majority)."""
    counts = Counter(labels)
    top, count = counts.most_common(1)[0]
    if len(counts) < 2 or count < MAJORITY * len(labels):
        return top, count, []
    return top, count, [i for i, label in enumerate(labels) if label != top]


def _system_prompt_findings(conversations: Sequence[Conversation]) -> list[Finding]:
    systems = [system_text(c) for c in conversations]
    counts = Counter(systems)
    if len(counts) < 2:
        return []
    top, count = counts.most_common(1)[0]
    if count * 2 <= len(systems):  # no majority: varied on purpose, or a mess; either way say so once
        return [Finding("info", "mixed-system-prompts", "", f"{len(counts)} different system prompts "
                                                            f"(the most common one in {count} of {len(systems)})")]
    usual = "no system prompt" if top is None else f"the system prompt {_preview(top)}"
    findings = []
    for conversation, system in zip(conversations, systems):
        if system != top:
            this = "no system prompt" if system is None else f"system prompt {_preview(system)}"
            findings.append(Finding("warning", "mixed-system-prompts", conversation.source,
                                    f"{this}, but {count} of {len(systems)} conversations have {usual}"))
    return findings


def _shape_findings(conversations: Sequence[Conversation]) -> list[Finding]:
    shapes = [response_shape(answer_text(c)) for c in conversations]
    top, count, odd = _odd_ones([shape for shape, _, _ in shapes])
    if top == "JSON object":  # a JSON majority makes broken JSON odd even when the majority is slim
        odd = [i for i, (shape, _, _) in enumerate(shapes) if shape != top]
    findings = []
    for i in odd:
        shape, _, error = shapes[i]
        detail = f"answer is {shape}" + (f" ({error})" if error else "")
        findings.append(Finding("warning", "response-shape", conversations[i].source,
                                f"{detail}, but {count} of {len(shapes)} answers are {top}: "
                                f"{_preview(answer_text(conversations[i]))}"))
    objects = [(i, keys) for i, (shape, keys, _) in enumerate(shapes) if shape == "JSON object"]
    if len(objects) >= MIN_FOR_STATISTICS:
        usual, count, odd = _odd_ones([keys for _, keys in objects])
        for k in odd:
            i, keys = objects[k]
            findings.append(Finding("warning", "response-shape", conversations[i].source,
                                    f"JSON keys ({', '.join(keys)}) differ from the usual ({', '.join(usual)}) "
                                    f"of {count} of {len(objects)} JSON answers"))
        findings += _rare_value_findings(conversations, [i for i, keys in objects if keys == usual], usual)
    return findings


def _rare_value_findings(conversations: Sequence[Conversation], rows: list[int],
                         keys: tuple[str, ...]) -> list[Finding]:
    """Values seen (almost) once in a JSON field that otherwise takes a few values: typos or odd labels."""
    values = {i: json.loads(answer_text(conversations[i])) for i in rows}
    findings = []
    for key in keys:
        column = [(i, values[i][key]) for i in rows if isinstance(values[i][key], (str, int, float, bool))]
        counts = Counter(value for _, value in column)
        if len(column) < 2 * MIN_FOR_STATISTICS or 5 * len(counts) > len(column):
            continue  # too little data, or free text rather than labels (labels repeat, 5x on average or more)
        rare = max(1, len(column) // 200)
        usual = ", ".join(f"{value} ({n})" for value, n in counts.most_common(6) if n > rare)
        for i, value in column:
            if counts[value] <= rare:
                findings.append(Finding("warning", "rare-value", conversations[i].source,
                                        f"{key}={json.dumps(value)} appears {counts[value]}x in {len(column)} answers; "
                                        f"usual values: {usual}"))
    return findings


def _length_findings(conversations: Sequence[Conversation]) -> list[Finding]:
    """Prompts or answers far longer or shorter than the rest (robust z-score on log length and a 3x ratio).

    An odd answer is a warning (it is what the model learns); an odd prompt is only info (varied prompts are good).
    """
    findings = []
    for part, text_of, severity in (("answer", answer_text, "warning"), ("prompt", prompt_text, "info")):
        lengths = [len(text_of(c)) for c in conversations]
        logs = [math.log1p(n) for n in lengths]
        median = statistics.median(logs)
        spread = 1.4826 * statistics.median(abs(x - median) for x in logs) or 1e-9
        typical = round(math.expm1(median))
        for conversation, n, x in zip(conversations, lengths, logs):
            z = (x - median) / spread
            if (z > 3.5 and n > 3 * typical) or (z < -3.5 and 3 * n < typical):
                findings.append(Finding(severity, "outlier-length", conversation.source,
                                        f"{part} is {n:,} characters; typical is {typical:,}"))
    return findings


def find_inconsistencies(conversations: Sequence[Conversation]) -> list[Finding]:
    """Mixed system prompts, answers shaped unlike the majority, rare label values, outlier lengths."""
    findings = _system_prompt_findings(conversations)
    if len(conversations) >= MIN_FOR_STATISTICS:
        findings += _shape_findings(conversations) + _length_findings(conversations)
    return findings


def lint_conversations(splits: Mapping[str, Sequence[Conversation]],
                       threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Finding]:
    """Every model-free check on checked conversations; ``splits`` maps ``train``/``val``/others to data.

    Duplicates and consistency are checked per split (the validation set should look like training);
    every split other than ``train`` is checked for prompts leaking from ``train``.
    """
    findings = []
    for conversations in splits.values():
        findings += find_duplicates(conversations, threshold) + find_inconsistencies(conversations)
    train = splits.get("train", ())
    for name, conversations in splits.items():
        if name != "train" and train:
            findings += find_leakage(train, conversations, threshold, "validation" if name == "val" else name)
    return findings


# -- tokenizer checks -------------------------------------------------------------------------------
def _empty_stats() -> dict[str, Any]:
    return {"conversations": 0, "turns": dict.fromkeys(ROLES, 0), "tokens": dict.fromkeys(ROLES, 0),
            "total_tokens": 0, "trained_tokens": 0, "truncated": 0, "dropped": 0, "assistant_tokens_lost": 0}


def role_token_counts(messages: Sequence[Mapping[str, Any]], tokenizer: Any,
                      chat_template: str | None = None) -> dict[str, int]:
    """Tokens each role takes in the rendered conversation, template tokens (headers, end-of-turn) included."""
    counts, previous = dict.fromkeys(ROLES, 0), 0
    for end in range(1, len(messages) + 1):
        try:
            text = render_text(tokenizer, messages[:end], chat_template)
        except TemplateRefusedError:  # e.g. a template that needs an assistant last: the next prefix counts it
            continue
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        counts[messages[end - 1]["role"]] += max(0, length - previous)
        previous = length
    return counts


def token_checks(conversations: Sequence[Conversation], tokenizer: Any, max_length: int,
                 truncation: Literal["cut", "drop"] = "cut", chat_template: str | None = None,
                 labelling: Mapping[str, Any] | None = None,
                 ) -> tuple[dict[str, Any], list[Finding], list[tuple[Conversation, dict[str, list[int]]]]]:
    """Count turns and tokens per role, trained tokens and truncation losses with the model's chat template.

    ``labelling`` holds the label settings of :func:`~lightning_ft.data.collate.encode_conversation`
    (``stop_tokens``, ``masking``, ``train_reasoning``), as the data module passes them.

    Returns:
        The counts, findings (``truncated`` warnings, errors for conversations that would train nothing or
        that the template cannot render), and the ``(conversation, example)`` pairs as training would see them.
    """
    stats, findings, kept_examples = _empty_stats(), [], []
    for conversation in conversations:
        try:
            example = encode_conversation(conversation.messages, tokenizer, chat_template=chat_template,
                                          **(labelling or {}))
            roles = role_token_counts(conversation.messages, tokenizer, chat_template)
        except EmptyLabelsError as error:
            findings.append(Finding("error", "no-trained-tokens", conversation.source, str(error)))
            continue
        except Exception as error:  # a template that cannot render this conversation: report, never crash
            findings.append(Finding("error", "template", conversation.source, f"{type(error).__name__}: {error}"))
            continue
        stats["conversations"] += 1
        for message in conversation.messages:
            stats["turns"][message["role"]] += 1
        for role, n in roles.items():
            stats["tokens"][role] += n
        stats["total_tokens"] += len(example["input_ids"])
        trained = count_trained(example["labels"])
        kept = truncate_example(example, max_length, truncation)
        too_long = f"{len(example['input_ids']):,} tokens > max_length={max_length}"
        if kept is None:
            stats["dropped"] += 1
            stats["assistant_tokens_lost"] += trained
            findings.append(Finding("warning", "truncated", conversation.source,
                                    f"{too_long}: dropped (truncation='drop'), losing {trained:,} assistant tokens"))
            continue
        if kept is not example:
            lost = trained - count_trained(kept["labels"])
            stats["truncated"] += 1
            stats["assistant_tokens_lost"] += lost
            if lost == trained:
                findings.append(Finding("error", "no-trained-tokens", conversation.source,
                                        f"{too_long}: the cut leaves no assistant token (raise max_length, or set "
                                        "truncation='drop' to skip such conversations)"))
                continue
            findings.append(Finding("warning", "truncated", conversation.source,
                                    f"{too_long}: cut, losing {lost:,} of {trained:,} assistant tokens"))
        stats["trained_tokens"] += count_trained(kept["labels"])
        kept_examples.append((conversation, kept))
    return stats, findings, kept_examples
