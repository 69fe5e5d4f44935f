"""Dataset linting: structured findings about chat data, from bad records to duplicates and odd answers.

Every check is a function from conversations (and, for token counts, a tokenizer) to a list of
:class:`Finding`, so ``lightning_ft check-data`` reports them all and ``ChatDataModule`` reuses the
model-free ones at ``fit`` time. Nothing here raises on bad data: a problem becomes a finding.

The model-free checks stream over the data once per split (:mod:`lightning_ft.data.lint`), keeping a few
numbers per conversation; near-duplicates are the word 3-gram Jaccard similarity of the normalised text
(lowercase, punctuation and whitespace collapsed), found with MinHash/LSH and confirmed exactly
(:mod:`lightning_ft.data.minhash`), so memory never holds all pairs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from pytorch_lightning.utilities import rank_zero_warn

from lightning_ft.data.collate import (
    EmptyLabelsError,
    count_trained,
    encode_conversations,
    render_texts,
    truncate_example,
)
from lightning_ft.atomic import write_text_atomic
from lightning_ft.data.encode import content_digest
from lightning_ft.data.formats import ROLES, Conversation, DataError, DataProblem
from lightning_ft.data import minhash
from lightning_ft.data.lint import (
    SHAPES,
    ArrowRows,
    ConversationRows,
    Features,
    Rows,
    answer_of,
    digest,
    features,
    first_of_each,
    length_outliers,
    majority,
    prompt_of,
    response_shape,
    system_of,
    value_counts,
)
from lightning_ft.data.minhash import normalize
from lightning_ft.data.sources import SourceData
from lightning_ft.models import cache_dir
from lightning_ft.progress import StageProgress

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
def prompt_text(conversation: Conversation) -> str:
    """Every non-system message before the last assistant turn."""
    return prompt_of(conversation.messages)


def answer_text(conversation: Conversation) -> str:
    """The last assistant message."""
    return answer_of(conversation.messages)


def system_text(conversation: Conversation) -> str | None:
    return system_of(conversation.messages)


def _as_rows(data: Sequence[Conversation] | Rows) -> Rows:
    return data if hasattr(data, "batches") else ConversationRows(data)  # type: ignore[arg-type]


# -- model-free checks ------------------------------------------------------------------------------
def find_duplicates(conversations: Sequence[Conversation] | Rows, threshold: float = NEAR_DUPLICATE_THRESHOLD,
                    found: Features | None = None) -> list[Finding]:
    """Exact duplicates, the same prompt with a different answer, and near-duplicates (later copy reported).

    Near-duplicates are pairs whose word 3-gram Jaccard similarity reaches ``threshold``, found by
    MinHash/LSH (:mod:`lightning_ft.data.minhash`) and confirmed exactly. ``found`` are the rows'
    :class:`~lightning_ft.data.lint.Features` when the caller already has them.
    """
    rows = _as_rows(conversations)
    found = found if found is not None else features(rows)
    raw_first, prompt_first = first_of_each(found.raw), first_of_each(found.prompt)
    findings, reported = [], np.zeros(len(rows), dtype=bool)
    for j in np.flatnonzero((raw_first != np.arange(len(rows))) | (prompt_first != np.arange(len(rows)))):
        j, reported[j] = int(j), True
        if raw_first[j] != j:
            findings.append(Finding("warning", "exact-duplicate", rows.location(j),
                                    f"identical to {rows.location(int(raw_first[j]))}"))
        elif found.answer[prompt_first[j]] != found.answer[j]:
            i = int(prompt_first[j])
            findings.append(Finding("warning", "conflicting-answers", rows.location(j),
                                    f"same prompt as {rows.location(i)} but a different answer: "
                                    f"{_preview(answer_of(rows.messages(j)))} vs {_preview(answer_of(rows.messages(i)))}"))
        else:
            findings.append(Finding("warning", "near-duplicate", rows.location(j),
                                    f"same text as {rows.location(int(prompt_first[j]))} up to case and punctuation"))

    def text(index: int) -> frozenset[str]:
        messages = rows.messages(index)
        return minhash.shingles(prompt_of(messages) + "\n" + answer_of(messages))

    near = minhash.confirmed(minhash.candidates(found.text_bands, skip=reported), text, text, threshold)
    for j, (i, similarity) in sorted(near.items()):
        findings.append(Finding("warning", "near-duplicate", rows.location(j),
                                f"{similarity:.0%} similar to {rows.location(i)}"))
    return findings


def find_leakage(train: Sequence[Conversation] | Rows, held_out: Sequence[Conversation] | Rows,
                 threshold: float = NEAR_DUPLICATE_THRESHOLD, name: str = "validation",
                 train_found: Features | None = None, held_found: Features | None = None) -> list[Finding]:
    """Held-out conversations whose prompt is (nearly) a training prompt: their scores would be inflated."""
    train, held_out = _as_rows(train), _as_rows(held_out)
    train_found = train_found if train_found is not None else features(train, prompt_bands=True)
    held_found = held_found if held_found is not None else features(held_out, prompt_bands=True)
    unique, first = np.unique(train_found.prompt, return_index=True)
    at = np.searchsorted(unique, held_found.prompt).clip(max=max(len(unique) - 1, 0))
    exact = (unique[at] == held_found.prompt) if len(unique) else np.zeros(len(held_out), dtype=bool)
    findings = [Finding("warning", "leakage", held_out.location(int(j)),
                        f"{name} prompt also in the training data at {train.location(int(first[at[j]]))}")
                for j in np.flatnonzero(exact)]
    near = minhash.confirmed(
        ((i, j) for i, j in minhash.cross_candidates(train_found.prompt_bands, held_found.prompt_bands)
         if not exact[j]),
        lambda i: minhash.shingles(prompt_of(train.messages(i))),
        lambda j: minhash.shingles(prompt_of(held_out.messages(j))), threshold)
    for j, (i, similarity) in sorted(near.items()):
        findings.append(Finding("warning", "leakage", held_out.location(j),
                                f"{name} prompt {similarity:.0%} similar to training prompt at {train.location(i)}"))
    return sorted(findings, key=lambda f: _position(held_out, f.location))


def _position(rows: Rows, location: str) -> int:
    # Findings come out per kind; a held-out set is small enough to order them by row once.
    return next((i for i in range(len(rows)) if rows.location(i) == location), 0)


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


def _odd_ones(values: np.ndarray) -> tuple[Any, int, np.ndarray]:
    """The majority value, its count, and the indices that differ (empty unless it has a clear majority)."""
    top, count, distinct = majority(values)
    if distinct < 2 or count < MAJORITY * len(values):
        return top, count, np.zeros(0, dtype=np.int64)
    return top, count, np.flatnonzero(values != top)


def _system_prompt_findings(rows: Rows, found: Features) -> list[Finding]:
    top, count, distinct = majority(found.system)
    if distinct < 2:
        return []
    total = len(found.system)
    if count * 2 <= total:  # no majority: varied on purpose, or a mess; either way say so once
        return [Finding("info", "mixed-system-prompts", "", f"{distinct} different system prompts "
                                                            f"(the most common one in {count} of {total})")]
    usual_text = system_of(rows.messages(int(np.flatnonzero(found.system == top)[0])))
    usual = "no system prompt" if usual_text is None else f"the system prompt {_preview(usual_text)}"
    findings = []
    for i in np.flatnonzero(found.system != top):
        system = system_of(rows.messages(int(i)))
        this = "no system prompt" if system is None else f"system prompt {_preview(system)}"
        findings.append(Finding("warning", "mixed-system-prompts", rows.location(int(i)),
                                f"{this}, but {count} of {total} conversations have {usual}"))
    return findings


def _shape_findings(rows: Rows, found: Features) -> list[Finding]:
    top, count, odd = _odd_ones(found.shape)
    if SHAPES[top] == "JSON object":  # a JSON majority makes broken JSON odd even when the majority is slim
        odd = np.flatnonzero(found.shape != top)
    findings = []
    for i in odd.tolist():
        answer = answer_of(rows.messages(i))
        shape, _, error = response_shape(answer)
        detail = f"answer is {shape}" + (f" ({error})" if error else "")
        findings.append(Finding("warning", "response-shape", rows.location(i),
                                f"{detail}, but {count} of {len(found.shape)} answers are {SHAPES[top]}: "
                                f"{_preview(answer)}"))
    objects = np.flatnonzero(found.shape == SHAPES.index("JSON object"))
    if len(objects) >= MIN_FOR_STATISTICS:
        usual_hash, count, odd = _odd_ones(found.keys[objects])
        usual = response_shape(answer_of(rows.messages(int(objects[found.keys[objects] == usual_hash][0]))))[1]
        for i in objects[odd].tolist():
            keys = response_shape(answer_of(rows.messages(i)))[1]
            findings.append(Finding("warning", "response-shape", rows.location(i),
                                    f"JSON keys ({', '.join(keys)}) differ from the usual ({', '.join(usual)}) "
                                    f"of {count} of {len(objects)} JSON answers"))
        findings += _rare_value_findings(rows, objects[found.keys[objects] == usual_hash], usual)
    return findings


def _rare_value_findings(rows: Rows, indices: np.ndarray, keys: tuple[str, ...]) -> list[Finding]:
    """Values seen (almost) once in a JSON field that otherwise takes a few values: typos or odd labels."""
    findings = []
    for key, (counts, seen) in value_counts(rows, indices, keys).items():
        total = sum(counts.values())
        if total < 2 * MIN_FOR_STATISTICS or 5 * len(counts) > total:
            continue  # too little data, or free text rather than labels (labels repeat, 5x on average or more)
        rare = max(1, total // 200)
        usual = ", ".join(f"{seen[code]} ({n})" for code, n in counts.most_common(6) if n > rare)
        if min(counts.values()) > rare:
            continue  # nothing rare: no answer needs reading again
        for i in indices.tolist():
            value = json.loads(answer_of(rows.messages(i)))[key]
            code = digest(json.dumps(value)) if isinstance(value, (str, int, float, bool)) else None
            if code is not None and counts[code] <= rare:
                findings.append(Finding("warning", "rare-value", rows.location(i),
                                        f"{key}={json.dumps(value)} appears {counts[code]}x in {total} answers; "
                                        f"usual values: {usual}"))
    return findings


def _length_findings(rows: Rows, found: Features) -> list[Finding]:
    """Prompts or answers far longer or shorter than the rest (robust z-score on log length and a 3x ratio).

    An odd answer is a warning (it is what the model learns); an odd prompt is only info (varied prompts are good).
    """
    findings = []
    for part, lengths, severity in (("answer", found.answer_length, "warning"),
                                    ("prompt", found.prompt_length, "info")):
        odd, typical = length_outliers(lengths)
        findings += [Finding(severity, "outlier-length", rows.location(int(i)),
                             f"{part} is {int(lengths[i]):,} characters; typical is {typical:,}") for i in odd]
    return findings


def find_inconsistencies(conversations: Sequence[Conversation] | Rows,
                         found: Features | None = None) -> list[Finding]:
    """Mixed system prompts, answers shaped unlike the majority, rare label values, outlier lengths."""
    rows = _as_rows(conversations)
    if not len(rows):
        return []
    found = found if found is not None else features(rows)
    findings = _system_prompt_findings(rows, found)
    if len(rows) >= MIN_FOR_STATISTICS:
        findings += _shape_findings(rows, found) + _length_findings(rows, found)
    return findings


def lint_conversations(splits: Mapping[str, Sequence[Conversation] | Rows],
                       threshold: float = NEAR_DUPLICATE_THRESHOLD, progress: bool = False) -> list[Finding]:
    """Every model-free check; ``splits`` maps ``train``/``val``/others to conversations or :class:`Rows`.

    Duplicates and consistency are checked per split (the validation set should look like training);
    every split other than ``train`` is checked for prompts leaking from ``train``. Each split is read once
    (plus the rows findings quote), so memory stays a few numbers per conversation. ``progress`` prints a
    line every 10 s of the pass once it has taken 3 s.
    """
    rows = {name: _as_rows(data) for name, data in splits.items()}
    leaks = any(name != "train" and len(data) for name, data in rows.items()) and len(rows.get("train", ()))
    reading = StageProgress("Checking the data", sum(len(data) for data in rows.values()),
                            "conversations") if progress else None
    found = {name: features(data, prompt_bands=bool(leaks), progress=reading)
             for name, data in rows.items() if len(data)}
    if reading is not None:
        reading.close()
    findings = []
    for name, data in rows.items():
        if name in found:
            findings += find_duplicates(data, threshold, found[name]) + find_inconsistencies(data, found[name])
    for name, data in rows.items():
        if name != "train" and name in found and leaks:
            findings += find_leakage(rows["train"], data, threshold, "validation" if name == "val" else name,
                                     found["train"], found[name])
    return findings


#: Bumped whenever a check changes what it finds, invalidating every stored report.
CHECKS_VERSION = 1


def lint_sources(splits: Mapping[str, Sequence[tuple[SourceData, Any]]], cache: bool = True,
                 progress: bool = False) -> list[Finding]:
    """:func:`lint_conversations` over sources read into Arrow (``{split: [(source, conversations), ...]}``).

    With ``cache``, the findings are kept in ``$LIGHTNING_FT_CACHE/checks/<key>.json``, keyed by the checks'
    version and threshold and by each part's source, locations and content, so a run on data checked before
    reads them back instead of checking it again (a report that cannot be read is checked afresh).
    """
    rows = {name: ArrowRows(list(parts)) for name, parts in splits.items()}
    if not cache:
        return lint_conversations(rows, progress=progress)
    identity = [CHECKS_VERSION, NEAR_DUPLICATE_THRESHOLD,
                {name: [[part.source.label, part.units, content_digest(data)] for part, data in parts]
                 for name, parts in splits.items()}]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / "checks" / f"{key}.json"
    try:
        return [Finding(**item) for item in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: check the data
        pass
    findings = lint_conversations(rows, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps([asdict(finding) for finding in findings]))
    except OSError:  # a read-only cache only costs the next run the checks
        pass
    return findings


# -- tokenizer checks -------------------------------------------------------------------------------
def _empty_stats() -> dict[str, Any]:
    return {"conversations": 0, "turns": dict.fromkeys(ROLES, 0), "tokens": dict.fromkeys(ROLES, 0),
            "total_tokens": 0, "trained_tokens": 0, "truncated": 0, "dropped": 0, "assistant_tokens_lost": 0}


def role_token_counts(messages: Sequence[Mapping[str, Any]], tokenizer: Any,
                      chat_template: str | None = None) -> dict[str, int]:
    """Tokens each role takes in the rendered conversation, template tokens (headers, end-of-turn) included."""
    return role_token_counts_many([messages], tokenizer, chat_template)[0]


def role_token_counts_many(conversations: Sequence[Sequence[Mapping[str, Any]]], tokenizer: Any,
                           chat_template: str | None = None) -> list[dict[str, int]]:
    """:func:`role_token_counts` of many conversations: every prefix rendered, then tokenised in one batch.

    A prefix the template refuses (e.g. one that must end with the assistant) is skipped: the next one counts it.
    """
    prefixes = [(c, end) for c, messages in enumerate(conversations) for end in range(1, len(messages) + 1)]
    texts = render_texts([conversations[c][:end] for c, end in prefixes], tokenizer, chat_template)
    rendered = [i for i, text in enumerate(texts) if isinstance(text, str)]
    lengths = dict(zip(rendered, map(len, tokenizer([texts[i] for i in rendered], add_special_tokens=False)[
        "input_ids"]))) if rendered else {}
    counts = [dict.fromkeys(ROLES, 0) for _ in conversations]
    previous = [0] * len(conversations)
    for i, (c, end) in enumerate(prefixes):
        if i in lengths:
            counts[c][conversations[c][end - 1]["role"]] += max(0, lengths[i] - previous[c])
            previous[c] = lengths[i]
    return counts


def _chunks(conversations: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    chunk: list[Conversation] = []
    for conversation in conversations:
        chunk.append(conversation)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def token_checks(conversations: Iterable[Conversation], tokenizer: Any, max_length: int,
                 truncation: Literal["cut", "drop"] = "cut", chat_template: str | None = None,
                 labelling: Mapping[str, Any] | None = None, keep: int | None = None,
                 ) -> tuple[dict[str, Any], list[Finding], list[tuple[Conversation, dict[str, list[int]]]]]:
    """Count turns and tokens per role, trained tokens and truncation losses with the model's chat template.

    ``labelling`` holds the label settings of :func:`~lightning_ft.data.collate.encode_conversation`
    (``stop_tokens``, ``masking``, ``train_reasoning``), as the data module passes them. Conversations are
    encoded a batch at a time and may be streamed: only the first ``keep`` examples are kept (all: ``None``).

    Returns:
        The counts, findings (``truncated`` warnings, errors for conversations that would train nothing or
        that the template cannot render), and the ``(conversation, example)`` pairs as training would see them.
    """
    stats, findings, kept_examples = _empty_stats(), [], []
    for chunk in _chunks(conversations, 256):
        results = encode_conversations([c.messages for c in chunk], tokenizer, chat_template=chat_template,
                                       **(labelling or {}))
        try:
            roles = role_token_counts_many([c.messages for c in chunk], tokenizer, chat_template)
        except Exception:  # noqa: BLE001 - a template that fails oddly: count each alone, report, never crash
            roles = [None] * len(chunk)
        for conversation, example, counts in zip(chunk, results, roles):
            if isinstance(example, EmptyLabelsError):
                findings.append(Finding("error", "no-trained-tokens", conversation.source, str(example)))
                continue
            if isinstance(example, Exception) or counts is None:
                error = example if isinstance(example, Exception) else ValueError("the template cannot render it")
                findings.append(Finding("error", "template", conversation.source, f"{type(error).__name__}: {error}"))
                continue
            kept = _count(conversation, example, counts, stats, findings, max_length, truncation)
            if kept is not None and (keep is None or len(kept_examples) < keep):
                kept_examples.append((conversation, kept))
    return stats, findings, kept_examples


def _count(conversation: Conversation, example: dict[str, list[int]], roles: dict[str, int], stats: dict[str, Any],
           findings: list[Finding], max_length: int, truncation: Literal["cut", "drop"]) -> dict[str, list[int]] | None:
    """Add one encoded conversation to ``stats`` and its truncation to ``findings``; the example as trained."""
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
        return None
    if kept is not example:
        lost = trained - count_trained(kept["labels"])
        stats["truncated"] += 1
        stats["assistant_tokens_lost"] += lost
        if lost == trained:
            findings.append(Finding("error", "no-trained-tokens", conversation.source,
                                    f"{too_long}: the cut leaves no assistant token (raise max_length, or set "
                                    "truncation='drop' to skip such conversations)"))
            return None
        findings.append(Finding("warning", "truncated", conversation.source,
                                f"{too_long}: cut, losing {lost:,} of {trained:,} assistant tokens"))
    stats["trained_tokens"] += count_trained(kept["labels"])
    return kept
