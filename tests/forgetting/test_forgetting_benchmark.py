"""Multiple-choice benchmark: file checks, subsampling, lm-eval-style encoding and batched scoring."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from forgetting_helpers import write_benchmark
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_ft import ForgettingCheck
from lightning_ft.forgetting.benchmark import (
    BenchmarkError,
    MCItem,
    context_for,
    encode_pair,
    choice_loglikelihoods,
    encode_items,
    item_outcomes,
    read_benchmark,
    score_benchmark,
    stratified_sample,
    summarize,
)

GOOD = {"question": "Q?", "choices": ["a", "b"], "answer": 0}


@pytest.mark.parametrize(("record", "expected"), [
    ({"question": "Q?", "options": ["a", "b"], "answer": 0}, r"bench.jsonl:2: choices: missing \(found unknown field 'options'\)"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, r"bench.jsonl:2: answer: 2 is out of range for 2 choices \(allowed 0..1\)"),
    ({"question": "Q?", "choices": ["a"], "answer": 0}, r"bench.jsonl:2: choices: needs at least two choices, got 1"),
    ({"question": "Q?", "choices": "a, b", "answer": 0}, r"bench.jsonl:2: choices: must be a list of non-empty strings"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "A"}, r"bench.jsonl:2: answer: must be an integer index"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, r"bench.jsonl:2: question: must be a non-empty string"),
    (["Q?", ["a", "b"], 0], r"bench.jsonl:2: must be a JSON object with fields question, choices, answer, subject"),
])
def test_bad_item_is_reported_with_file_line_and_field_at_construction(tmp_path, record, expected):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(BenchmarkError, match=r"1 problem in the benchmark:\n  .*" + expected):
        ForgettingCheck(benchmark_path=str(path))


def test_empty_and_broken_files_and_all_problems_at_once(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BenchmarkError, match=r"empty.jsonl: no items \(the file is empty\)"):
        ForgettingCheck(benchmark_path=str(empty))
    with pytest.raises(BenchmarkError, match=r"missing.jsonl: file not found"):
        read_benchmark(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q?", "choices": ["a", "b"], "answer": 5}\n{not json\n'
                      '{"question": "Q?", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(BenchmarkError, match=r"(?s)3 problems in the benchmark:\n  .*broken.jsonl:1: answer: 5 is out of "
                                             r"range.*broken.jsonl:2: invalid JSON.*broken.jsonl:3: choices: needs at least two"):
        read_benchmark(broken)


def test_items_keep_their_source_and_default_subject(tmp_path):
    items = read_benchmark(write_benchmark(tmp_path / "b.jsonl"))
    assert len(items) == 6 and items[4].subject == "general" and items[4].source.endswith("b.jsonl:5")
    assert items[0] == MCItem("What is the capital of France?", ("London", "Paris", "Rome"), 1, "geography",
                              str(tmp_path / "b.jsonl") + ":1")


def test_shipped_benchmark_and_stratified_subsample():
    items = read_benchmark()
    assert len(items) == 359
    chosen = stratified_sample([item.subject for item in items], 100, seed=0)
    assert len(chosen) == 100 == len(set(chosen)) and chosen == sorted(chosen)
    per_subject = collections.Counter(items[i].subject for i in chosen)
    assert len(per_subject) == 12 and set(per_subject.values()) <= {8, 9}
    assert chosen == stratified_sample([item.subject for item in items], 100, seed=0)
    assert chosen != stratified_sample([item.subject for item in items], 100, seed=1)
    assert stratified_sample(["a", "b"], None, 0) == stratified_sample(["a", "b"], 5, 0) == [0, 1]


def test_encode_pair_splits_like_lm_eval(tiny_tokenizer):
    context, continuation = encode_pair(tiny_tokenizer, "Question: What is 2 + 2?\nAnswer:", " 4")
    assert context == tiny_tokenizer("Question: What is 2 + 2?\nAnswer:")["input_ids"]
    assert context + continuation == tiny_tokenizer("Question: What is 2 + 2?\nAnswer: 4")["input_ids"]
    # A trailing space moves into the continuation, so " 4" is tokenised as one word.
    assert encode_pair(tiny_tokenizer, "Answer: ", "4") == encode_pair(tiny_tokenizer, "Answer:", " 4")


def naive_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The reference: one unpadded sequence, log-probability of each continuation token summed in a loop."""
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(context + continuation)["input_ids"][len(context_ids):]
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(input_ids=tokens).logits[0].double().log_softmax(-1)
    total = 0.0
    for offset, token in enumerate(continuation_ids):
        total += logprobs[len(context_ids) - 1 + offset, token].item()
    return total


def test_batched_scoring_equals_naive_one_at_a_time(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    items = read_benchmark(write_benchmark(tmp_path / "b.jsonl"))
    encoded = encode_items(items, tiny_tokenizer)
    assert [len(e.continuations) for e in encoded] == [len(item.choices) for item in items]
    naive = [[naive_loglikelihood(model, tiny_tokenizer, context_for(item), " " + choice) for choice in item.choices]
             for item in items]
    assert any(len(c) > 1 for e in encoded for c in e.continuations)  # multi-token continuations use the cache
    for batch_size in (1, 4, 16):  # one item at a time, uneven batches (left padding), all at once
        batched = choice_loglikelihoods(model, encoded, batch_size, tiny_tokenizer.pad_token_id)
        for got, expected in zip(batched, naive):
            assert got == pytest.approx(expected, abs=1e-4)
    outcomes = item_outcomes(items, dict(enumerate(batched)))
    assert torch.equal(outcomes, item_outcomes(items, dict(enumerate(naive))))
    assert score_benchmark(model, tiny_tokenizer, items, batch_size=3) == summarize(items, outcomes)


def test_acc_acc_norm_and_per_subject_from_scores():
    items = [MCItem("q1", ("a", "bbbb"), 1, "s1", "f:1"), MCItem("q2", ("aa", "b"), 0, "s1", "f:2"),
             MCItem("q3", ("x", "y", "z"), 2, "s2", "f:3")]
    # q1: raw prefers "a" (-1 > -2), per character prefers "bbbb" (-0.5 < -2/4). q2: both prefer "aa".
    # q3: a tie between choices 1 and 2 goes to the first (wrong) one, as numpy.argmax does.
    scores = {0: [-1.0, -2.0], 1: [-1.0, -3.0], 2: [-5.0, -1.0, -1.0]}
    outcomes = item_outcomes(items, scores)
    assert outcomes.tolist() == [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    metrics = summarize(items, outcomes)
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["acc_norm"] == pytest.approx(2 / 3)
    assert metrics["subject/s1/acc"] == 0.5 and metrics["subject/s1/acc_norm"] == 1.0
    assert metrics["subject/s2/acc"] == 0.0
    # A shard's outcomes leave other items at zero, so shards add up to the whole.
    shards = item_outcomes(items, {0: scores[0], 2: scores[2]}) + item_outcomes(items, {1: scores[1]})
    assert torch.equal(shards, outcomes)
