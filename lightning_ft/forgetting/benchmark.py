"""Multiple-choice benchmarks: read and check MMLU-style JSONL, subsample, and score by log-likelihood.

One item per line::

    {"question": "What is the capital of France?", "choices": ["London", "Paris"], "answer": 1, "subject": "geography"}

``subject`` is optional (items without one count as ``"general"``); other extra fields are ignored.

Scoring mirrors lm-evaluation-harness's zero-shot ``output_type: multiple_choice`` exactly, so numbers
agree with an lm-eval task defined with ``doc_to_text: "Question: {{question}}\\nAnswer:"``,
``doc_to_choice: "{{choices}}"`` and ``doc_to_target: "{{answer}}"``:

- context ``"Question: {question}\\nAnswer:"``, continuation ``" " + choice`` (lm-eval's default
  ``target_delimiter``);
- the pair is tokenised without special tokens (lm-eval's default for causal LMs) as
  ``encode(context)`` followed by ``encode(context + continuation)[len(encode(context)):]``, so a BPE
  merge across the boundary is resolved the same way lm-eval resolves it;
- a choice's score is the summed log-probability of its continuation tokens;
- ``acc``: the highest score is the answer; ``acc_norm``: the highest score divided by the choice's
  length in characters (lm-eval's ``len(choice)``, the choice text without the delimiter; that is the
  byte length for ASCII text). Ties go to the first choice (``numpy.argmax``).

All (item, choice) pairs are scored together in right-padded batches sorted by length, so a benchmark
costs a few forward passes rather than one per choice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ft.data.formats import DataProblem, _load_records

#: The general-knowledge benchmark shipped with the package (359 items, 12 subjects).
DEFAULT_BENCHMARK = str(Path(__file__).resolve().parents[1] / "benchmarks" / "general.jsonl")
#: The subject of items that name none.
NO_SUBJECT = "general"
FIELDS = ("question", "choices", "answer", "subject")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be scored; the message lists every problem with file, line and field."""

    def __init__(self, problems: Sequence[DataProblem]) -> None:
        self.problems = list(problems)
        listed = [str(problem) for problem in self.problems[:50]]
        if len(self.problems) > 50:
            listed.append(f"... and {len(self.problems) - 50} more")
        count = len(self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the benchmark:\n  " + "\n  ".join(listed))


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question; ``source`` is ``file:line``."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str
    source: str


def _item_issues(record: Any) -> list[tuple[str | None, str]]:
    if not isinstance(record, dict):
        return [(None, f"must be a JSON object with fields {', '.join(FIELDS)}, got {type(record).__name__}")]
    issues: list[tuple[str | None, str]] = []
    unknown = sorted(set(record) - set(FIELDS))
    hint = f" (found unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))})" if unknown else ""
    for field in ("question", "choices", "answer"):
        if field not in record:
            issues.append((field, f"missing{hint}"))
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if "question" in record and (not isinstance(question, str) or not question.strip()):
        issues.append(("question", f"must be a non-empty string, got {question!r:.60}"))
    choices_ok = isinstance(choices, list) and all(isinstance(c, str) and c.strip() for c in choices)
    if "choices" in record and not choices_ok:
        issues.append(("choices", f"must be a list of non-empty strings, got {choices!r:.80}"))
    elif choices_ok and len(choices) < 2:
        issues.append(("choices", f"needs at least two choices, got {len(choices)}"))
    if "answer" in record:
        if not isinstance(answer, int) or isinstance(answer, bool):
            issues.append(("answer", f"must be an integer index into choices, got {answer!r:.40}"))
        elif choices_ok and not 0 <= answer < len(choices):
            issues.append(("answer", f"{answer} is out of range for {len(choices)} choices (allowed 0..{len(choices) - 1})"))
    subject = record.get("subject", NO_SUBJECT)
    if not isinstance(subject, str) or not subject.strip():
        issues.append(("subject", f"must be a non-empty string when present, got {subject!r:.40}"))
    return issues


def read_benchmark(path: str | Path | None = None) -> list[MCItem]:
    """Read and check a multiple-choice benchmark file (``.jsonl``, or ``.json`` holding a list).

    Args:
        path: The file; ``None`` reads :data:`DEFAULT_BENCHMARK`.

    Raises:
        BenchmarkError: Listing every problem at once as ``file:line: field: what is wrong``: invalid
            JSON, a missing or mistyped field, fewer than two choices, an ``answer`` out of range, an
            empty file.
    """
    path = str(DEFAULT_BENCHMARK if path is None else path)
    records, unit, problems = _load_records(path)
    if not records and not problems:
        problems = [DataProblem(path, None, None, "no items (the file is empty)")]
    items = []
    for number, record in records:
        issues = _item_issues(record)
        problems += [DataProblem(path, number, field, text, unit) for field, text in issues]
        if not issues:
            items.append(MCItem(record["question"], tuple(record["choices"]), record["answer"],
                                record.get("subject", NO_SUBJECT), f"{path}:{number}"))
    if problems:
        raise BenchmarkError(sorted(problems, key=lambda problem: problem.line or 0))
    return items


def stratified_sample(groups: Sequence[str], size: int | None, seed: int) -> list[int]:
    """Indices of ``size`` elements drawn without replacement, each group represented in proportion.

    Quotas are rounded by largest remainder, so 100 of 359 items over 12 subjects gives every subject 8
    or 9. The result is sorted, and the same for the same ``groups``, ``size`` and ``seed`` on every rank.
    """
    if size is None or size >= len(groups):
        return list(range(len(groups)))
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    exact = {group: size * len(indices) / len(groups) for group, indices in members.items()}
    quota = {group: int(share) for group, share in exact.items()}
    by_remainder = sorted(members, key=lambda group: (quota[group] - exact[group], group))
    for group in by_remainder[: size - sum(quota.values())]:
        quota[group] += 1
    rng = random.Random(seed)
    return sorted(index for group in sorted(members) for index in rng.sample(members[group], quota[group]))


def context_for(item: MCItem) -> str:
    """The lm-eval ``doc_to_text`` of an item: ``"Question: {question}\\nAnswer:"``."""
    return f"Question: {item.question}\nAnswer:"


@dataclass(frozen=True)
class Request:
    """One (item, choice) pair, tokenised: ``tokens`` = context then continuation; the last ``n_scored`` count."""

    item: int
    choice: int
    tokens: tuple[int, ...]
    n_scored: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces move to the continuation; the continuation is what follows
    the context's token count in the encoding of the whole string."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def encode_requests(items: Sequence[MCItem], tokenizer: Any, max_length: int | None = None) -> list[Request]:
    """Every (item, choice) pair of ``items`` as token ids, ready for :func:`score_requests`.

    Args:
        items: The questions.
        tokenizer: A Hugging Face tokenizer.
        max_length: Keep the last ``max_length`` tokens of a long pair (as lm-eval does); ``None`` keeps all.
    """
    requests = []
    for index, item in enumerate(items):
        for choice, text in enumerate(item.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, context_for(item), " " + text)
            if not continuation_ids:
                raise ValueError(f"{item.source}: choice {choice} {text!r} encodes to no tokens")
            tokens = (context_ids + continuation_ids)[-max_length:] if max_length else context_ids + continuation_ids
            requests.append(Request(index, choice, tuple(tokens), min(len(continuation_ids), len(tokens) - 1)))
    return requests


def _forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@torch.no_grad()
def score_requests(model: Any, requests: Sequence[Request], batch_size: int = 16, pad_token_id: int = 0,
                   forward: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] = _forward) -> torch.Tensor:
    """Summed continuation log-likelihood of every request, in float64, in the order given.

    Requests are sorted longest first and right-padded per batch, so similar lengths share a batch and
    the first batch shows at once whether the largest one fits in memory.
    """
    device = next(model.parameters()).device
    scores = torch.zeros(len(requests), dtype=torch.float64)
    order = sorted(range(len(requests)), key=lambda index: -len(requests[index].tokens))
    for start in range(0, len(order), batch_size):
        batch = [requests[index] for index in order[start:start + batch_size]]
        length = len(batch[0].tokens)
        input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, :len(request.tokens)] = torch.tensor(request.tokens)
            attention_mask[row, :len(request.tokens)] = 1
        logits = forward(model, input_ids.to(device), attention_mask.to(device))
        for row, request in enumerate(batch):
            end = len(request.tokens)
            # Position t predicts token t + 1: the scored tokens are predicted by the n positions before them.
            predicted = logits[row, end - 1 - request.n_scored:end - 1].float().log_softmax(dim=-1)
            targets = input_ids[row, end - request.n_scored:end].to(device)
            scores[order[start + row]] = predicted.gather(-1, targets[:, None]).sum().double().cpu()
    return scores


def item_outcomes(items: Sequence[MCItem], requests: Sequence[Request], scores: torch.Tensor) -> torch.Tensor:
    """``(len(items), 2)`` float64: whether each item is right by ``acc`` and by ``acc_norm``.

    Items with no request in ``requests`` (another rank's shard) stay zero, so shards add up.
    """
    per_item: dict[int, list[tuple[int, float]]] = {}
    for request, score in zip(requests, scores.tolist()):
        per_item.setdefault(request.item, []).append((request.choice, score))
    outcomes = torch.zeros(len(items), 2, dtype=torch.float64)
    for index, pairs in per_item.items():
        item = items[index]
        pairs.sort()
        best = max(range(len(pairs)), key=lambda k: (pairs[k][1], -k))
        best_norm = max(range(len(pairs)), key=lambda k: (pairs[k][1] / len(item.choices[pairs[k][0]]), -k))
        outcomes[index, 0] = float(pairs[best][0] == item.answer)
        outcomes[index, 1] = float(pairs[best_norm][0] == item.answer)
    return outcomes


def summarize(items: Sequence[MCItem], outcomes: torch.Tensor) -> dict[str, float]:
    """Flat metrics from :func:`item_outcomes` of all items: ``acc``, ``acc_norm``,
    ``subject/<name>/acc`` and ``subject/<name>/acc_norm``."""
    if not items:
        return {}
    metrics = {"acc": outcomes[:, 0].mean().item(), "acc_norm": outcomes[:, 1].mean().item()}
    for subject in sorted({item.subject for item in items}):
        rows = torch.tensor([item.subject == subject for item in items])
        metrics[f"subject/{subject}/acc"] = outcomes[rows, 0].mean().item()
        metrics[f"subject/{subject}/acc_norm"] = outcomes[rows, 1].mean().item()
    return metrics


def score_benchmark(model: Any, tokenizer: Any, items: Sequence[MCItem], batch_size: int = 16) -> dict[str, float]:
    """Score ``items`` on one process: :func:`encode_requests`, :func:`score_requests`, :func:`summarize`.

    Example::

        items = read_benchmark()  # the shipped general benchmark
        score_benchmark(model.eval(), tokenizer, items)["acc"]
    """
    requests = encode_requests(items, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_requests(model, requests, batch_size, pad)
    return summarize(items, item_outcomes(items, requests, scores))
