"""The model-free data checks and token counts of lightning_ft.data.checks, on hand-written conversations."""

from __future__ import annotations

import functools
import json
import random
import time
import zlib

import numpy as np
import pytest

from lightning_ft.data import minhash
from lightning_ft.data.checks import (
    find_duplicates,
    find_inconsistencies,
    find_leakage,
    lint_conversations,
    normalize,
    problem_finding,
    response_shape,
    role_token_counts,
    token_checks,
)
from lightning_ft.data.formats import Conversation, scan_file

SYSTEM = "Reply with JSON."


def conv(user: str, answer: str, line: int, system: str | None = SYSTEM, path: str = "t.jsonl") -> Conversation:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Conversation(tuple(messages), f"{path}:{line}")


def ticket(i: int, category: str = "billing") -> Conversation:
    # Distinct prompts: every word but the first differs per index, so no two are near-duplicates.
    user = f"Ticket {i}: " + " ".join(f"w{i}x{k}" for k in range(8))
    return conv(user, json.dumps({"category": category, "summary": f"Handle ticket {i}"}), i + 1)


def codes(findings) -> list[tuple[str, str, str]]:
    return [(f.severity, f.code, f.location) for f in findings]


def test_normalize_folds_case_punctuation_and_whitespace():
    assert normalize("  Hello,   WORLD!!\n") == "hello world"
    assert normalize("a_b-c") == "a b c"


def test_scan_problems_become_error_findings_with_codes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        "{not json",
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": "hello"}),
    ]) + "\n")
    _, problems = scan_file(path)
    found = {(f.code, int(f.location.rsplit(":", 1)[1])) for f in map(problem_finding, problems)}
    assert {("malformed-json", 1), ("unknown-role", 2), ("role-order", 3), ("missing-assistant", 4),
            ("empty-message", 5), ("wrong-type", 6), ("wrong-type", 7)} <= found
    assert all(f.severity == "error" for f in map(problem_finding, problems))


def test_exact_conflicting_and_near_duplicates():
    base = [ticket(i) for i in range(6)]
    exact = conv(base[0].messages[1]["content"], base[0].messages[2]["content"], 50)
    conflicting = conv(base[1].messages[1]["content"].upper(), json.dumps({"category": "shipping"}), 51)
    long_user = "My order of a blue kettle arrived with a cracked lid and the handle wobbles when I pour hot water out"
    near_a = conv(long_user, "Refund or replace the damaged kettle", 52)
    near_b = conv(long_user + " today", "Refund or replace the damaged kettle", 53)
    found = codes(find_duplicates([*base, exact, conflicting, near_a, near_b]))
    assert found == [("warning", "exact-duplicate", "t.jsonl:50"), ("warning", "conflicting-answers", "t.jsonl:51"),
                     ("warning", "near-duplicate", "t.jsonl:53")]
    assert not find_duplicates(base)


def test_near_duplicate_message_names_the_earlier_record_and_similarity():
    text = " ".join(f"word{k}" for k in range(40))  # 38 shared word 3-grams of 41: 93%
    findings = find_duplicates([conv(text, "ok", 1), conv(text + " more", "ok", 2)])
    assert str(findings[0]) == "t.jsonl:2: warning [near-duplicate] 93% similar to t.jsonl:1"


def test_leakage_exact_and_near_between_train_and_validation():
    train = [ticket(i) for i in range(5)]
    same_prompt = conv(train[2].messages[1]["content"], "different answer", 1, path="v.jsonl")
    near = conv(train[3].messages[1]["content"] + " thanks", "x", 2, path="v.jsonl")
    fresh = conv("Something entirely new about my invoice", "x", 3, path="v.jsonl")
    findings = find_leakage(train, [same_prompt, near, fresh])
    assert codes(findings) == [("warning", "leakage", "v.jsonl:1"), ("warning", "leakage", "v.jsonl:2")]
    assert "also in the training data at t.jsonl:3" in findings[0].message
    assert "% similar to training prompt at t.jsonl:4" in findings[1].message


def test_response_shapes():
    assert response_shape('{"a": 1, "b": 2}') == ("JSON object", ("a", "b"), None)
    assert response_shape("[1, 2]")[0] == "JSON array"
    assert response_shape('{"a": 1,')[0] == "broken JSON"
    assert response_shape("```json\n{}\n```")[0] == "code block"
    assert response_shape("- one\n- two")[0] == "list"
    assert response_shape("Sure, here it is.")[0] == "text"


def test_inconsistent_shapes_keys_rare_values_and_system_prompts():
    data = [ticket(i, category=["billing", "shipping"][i % 2]) for i in range(24)]
    data[3] = conv("Where is my parcel number three", "It is on its way!", 4)
    data[5] = conv("Charge twice number five", '{"category": "billing", "summary": "x"', 6)
    data[7] = conv("Refund please number seven", json.dumps({"category": "billing"}), 8)
    data[9] = conv("Card declined number nine", json.dumps({"category": "biling", "summary": "Fix card"}), 10)
    data[11] = conv("Login fails number eleven", json.dumps({"category": "billing", "summary": "x"}), 12,
                    system="Be terse.")
    found = {(f.code, f.location): f for f in find_inconsistencies(data)}
    assert "answer is text, but 22 of 24 answers are JSON object" in found["response-shape", "t.jsonl:4"].message
    assert "answer is broken JSON (Expecting" in found["response-shape", "t.jsonl:6"].message
    keys = found["response-shape", "t.jsonl:8"].message
    assert "JSON keys (category) differ from the usual (category, summary)" in keys
    assert 'category="biling" appears 1x' in found["rare-value", "t.jsonl:10"].message
    assert "system prompt 'Be terse.', but 23 of 24 conversations have the system prompt" in \
        found["mixed-system-prompts", "t.jsonl:12"].message


def test_varied_system_prompts_without_a_majority_are_one_info():
    data = [conv(f"Question {i} about w{i}", "Answer.", i, system=f"Persona {i}") for i in range(4)]
    assert codes(find_inconsistencies(data)) == [("info", "mixed-system-prompts", "")]


def test_outlier_answer_length_is_a_warning_and_prompt_length_info():
    data = [conv(f"Please help with problem w{i} quickly today", f"Fix problem w{i} now.", i) for i in range(20)]
    data.append(conv("Please help with problem z quickly today", "Fix it. " * 60, 20))
    data.append(conv("hi", "Fix problem q now.", 21))
    found = codes(f for f in find_inconsistencies(data) if f.code == "outlier-length")
    assert found == [("warning", "outlier-length", "t.jsonl:20"), ("info", "outlier-length", "t.jsonl:21")]


def test_small_datasets_skip_statistics():
    data = [conv("What is up", "{}", 1), conv("Hello there", "plain", 2)]
    assert find_inconsistencies(data) == []


def test_near_duplicates_scale_to_ten_thousand_conversations_without_false_positives():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 50))) for _ in range(10_000)]
    texts.append(texts[10] + " extra")
    data = [conv(text, "ok", i) for i, text in enumerate(texts)]
    started = time.perf_counter()
    findings = lint_conversations({"train": data})
    assert time.perf_counter() - started < 60  # a few seconds on one busy core
    assert [f for f in codes(findings) if f[0] == "warning"] == [("warning", "near-duplicate", "t.jsonl:10000")]


def test_near_duplicates_a_few_edits_apart_are_found_and_distinct_ones_are_not():
    rng = random.Random(2)
    words = [f"v{i}" for i in range(500)]
    originals = [[rng.choice(words) for _ in range(60)] for _ in range(300)]
    data = [conv(" ".join(text), "ok", i) for i, text in enumerate(originals)]
    edited = []
    for k, text in enumerate(originals[:40]):  # two words replaced: ~90% of the 3-grams stay
        copy = list(text)
        for position in rng.sample(range(60), 2):
            copy[position] = "edited"
        edited.append(conv(" ".join(copy), "ok", 1000 + k))
    found = find_duplicates(data + edited)
    assert {f.location for f in found} == {f"t.jsonl:{1000 + k}" for k in range(40)}
    assert all(f.code == "near-duplicate" and f"similar to t.jsonl:{k}" in f.message for k, f in enumerate(found))


def test_lsh_memory_holds_band_hashes_not_pairs():
    texts = [" ".join(f"t{i}x{k}" for k in range(30)) for i in range(2000)]
    bands = minhash.band_hashes(texts)
    assert bands.shape == (2000, minhash.BANDS) and bands.dtype == np.uint64
    assert not list(minhash.candidates(bands))  # distinct texts share no bucket: no pair is ever built
    same = minhash.band_hashes(["a b c d e"] * 50)
    pairs = list(minhash.candidates(same))  # 50 copies: each compared with a bounded number of earlier ones
    assert len(pairs) <= 50 * minhash.BANDS * minhash.PER_BUCKET and len(pairs) < 50 * 49 // 2 * minhash.BANDS


def test_batched_gram_hashes_are_each_texts_own():
    # The batch is hashed in one pass; each text must get the grams it gets alone: 3-word windows, or the
    # whole text as one gram when it has three words or fewer, none without words.
    def alone(text):
        words = [np.uint64(zlib.crc32(w)) for w in minhash.normalize(text).encode().split()]
        if len(words) <= 3:
            return [sum((w * g for w, g in zip(words, minhash._GRAM)), np.uint64(0))] if words else []
        return [words[i] * minhash._GRAM[0] + words[i + 1] * minhash._GRAM[1] + words[i + 2] * minhash._GRAM[2]
                for i in range(len(words) - 2)]

    rng = random.Random(3)
    texts = ["", "!!", "one", "one two", "one two three", "One, two; three four", "ä ü 日本 x"]
    texts += [" ".join(rng.choices("a b c d e f".split(), k=rng.randint(0, 12))) for _ in range(200)]
    with np.errstate(over="ignore"):
        flat, grams = minhash._gram_hashes([minhash.normalize(text) for text in texts])
        expected = [alone(text) for text in texts]
    assert grams.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [int(h) for e in expected for h in e]
    bands = minhash.band_hashes(texts)
    assert (bands[[not e for e in expected]] == 0).all() and (bands[[bool(e) for e in expected]] != 0).all()
    assert (minhash.band_hashes(texts[5:6]) == bands[5:6]).all()


def test_the_checks_say_how_far_they_are_when_asked(monkeypatch, capsys):
    from lightning_ft.data import checks
    from lightning_ft.progress import StageProgress

    monkeypatch.setattr(checks, "StageProgress", functools.partial(StageProgress, quiet_for=0, every=0))
    data = {"train": [ticket(i) for i in range(30)], "val": [ticket(100 + i) for i in range(5)]}
    assert checks.lint_conversations(data, progress=True) == checks.lint_conversations(data)
    lines = capsys.readouterr().out.splitlines()  # a line per batch read (one per split here), then the total
    assert len(lines) == 3 and lines[0].startswith("Checking the data: 30/35 conversations (86%, ETA ")
    assert lines[1].startswith("Checking the data: 35/35 conversations (100%, ETA ")
    assert lines[2].startswith("Checking the data: done, 35 conversations in ")


def test_role_tokens_sum_to_the_rendered_length(tiny_tokenizer):
    messages = ticket(1).messages
    counts = role_token_counts(messages, tiny_tokenizer)
    rendered = tiny_tokenizer.apply_chat_template(list(messages), tokenize=True)["input_ids"]
    assert sum(counts.values()) == len(rendered) and all(counts[r] > 0 for r in ("system", "user", "assistant"))


def test_token_checks_count_truncation_and_lost_assistant_tokens(tiny_tokenizer):
    short, long = ticket(1), conv("Tell me a story please", "Once upon a time " * 30, 2)
    full, _, examples = token_checks([short, long], tiny_tokenizer, max_length=10_000)
    assert full["truncated"] == 0 and full["conversations"] == 2 and full["turns"]["assistant"] == 2
    assert full["total_tokens"] == sum(len(example["input_ids"]) for _, example in examples)
    limit = len(examples[1][1]["input_ids"]) - 20
    assert limit > len(examples[0][1]["input_ids"])
    stats, findings, kept = token_checks([short, long], tiny_tokenizer, max_length=limit)
    assert stats["truncated"] == 1
    assert stats["assistant_tokens_lost"] == full["trained_tokens"] - stats["trained_tokens"]
    assert codes(findings) == [("warning", "truncated", "t.jsonl:2")] and len(kept) == 2
    assert f"> max_length={limit}: cut, losing {stats['assistant_tokens_lost']:,} of" in findings[0].message
    dropped, findings, kept = token_checks([short, long], tiny_tokenizer, max_length=limit, truncation="drop")
    assert dropped["dropped"] == 1 and len(kept) == 1 and "dropped (truncation='drop')" in findings[0].message


def test_a_cut_that_leaves_no_assistant_token_is_an_error(tiny_tokenizer):
    stats, findings, kept = token_checks([conv("why " * 80, "Because.", 1)], tiny_tokenizer, max_length=40)
    assert codes(findings) == [("error", "no-trained-tokens", "t.jsonl:1")] and not kept
    assert "raise max_length" in findings[0].message


def test_shorten_is_the_one_preview():
    from lightning_ft.data.checks import shorten

    assert shorten("a  b\n c", 10) == "a b c"
    assert shorten("abcdefghij", 5) == "abcd…" and len(shorten("x" * 500, 80)) == 80
    assert shorten("line one\nline two", 12, flatten=False) == "line one\nli…"
