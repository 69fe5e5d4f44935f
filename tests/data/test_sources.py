"""Sources: every kind of file, saved datasets, Hub ids offline, column mappings, and bad rows named by row."""

from __future__ import annotations

import json
import random
import re

import datasets
import pandas as pd
import pytest
from conftest import TINY_TOKENIZER_DIR

from lightning_ft.data.collate import encode_conversation
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.data.encode import encode_batch
from lightning_ft.data.formats import DataError
from lightning_ft.data.sources import Source, read_source


def alpaca(i: int) -> dict:
    return {"instruction": f"What is {i} plus one?", "output": f"It is {i + 1}."}


def messages(record: dict) -> list[tuple[str, str]]:
    return [("user", record["instruction"]), ("assistant", record["output"])]


def as_pairs(conversations) -> list[list[tuple[str, str]]]:
    return [[(m["role"], m["content"]) for m in c.messages] for c in conversations]


@pytest.fixture
def records():
    return [alpaca(i) for i in range(5)]


def _write_all(tmp_path, records) -> dict[str, str]:
    frame = pd.DataFrame(records)
    paths = {kind: str(tmp_path / f"data.{kind}") for kind in ("jsonl", "json", "parquet", "csv")}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "data.json").write_text(json.dumps(records))
    frame.to_parquet(paths["parquet"])
    frame.to_csv(paths["csv"], index=False)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    paths["saved"] = str(tmp_path / "saved")
    paths["arrow"] = str(next((tmp_path / "saved").glob("*.arrow")))
    half = tmp_path / "parts"
    half.mkdir()
    frame[:2].to_parquet(half / "a.parquet")
    frame[2:].to_parquet(half / "b.parquet")
    paths["glob"] = str(half / "*.parquet")
    return paths


def test_every_kind_of_source_reads_the_same_conversations(tmp_path, records):
    expected = [messages(r) for r in records]
    for kind, path in _write_all(tmp_path, records).items():
        data = read_source(path)
        assert not data.problems, kind
        assert as_pairs(data.conversations()) == expected, kind
    before = sorted(p.name for p in tmp_path.iterdir())
    read_source(str(tmp_path / "data.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to the user's files


def test_bad_rows_are_named_by_source_and_row_all_at_once(tmp_path, records):
    bad = [*records[:2], {"instruction": "Q", "output": ""}, records[3], {"instruction": "", "output": "A"}]
    pd.DataFrame(bad).to_parquet(tmp_path / "t.parquet")
    pd.DataFrame(bad).to_csv(tmp_path / "t.csv", index=False)
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "saved"))
    data = ChatDataModule(sources=[Source(str(tmp_path / name)) for name in ("t.parquet", "t.csv", "saved")],
                          tokenizer=TINY_TOKENIZER_DIR)
    with pytest.raises(DataError) as caught:
        data.prepare_data()
    lines = [str(problem) for problem in caught.value.problems]
    for name in ("t.parquet", "saved"):
        assert f"{tmp_path / name}:row 2: output: empty assistant message" in lines
        assert f"{tmp_path / name}:row 4: instruction: empty user message" in lines
    # CSV reads an empty cell as missing: still named by row.
    assert f"{tmp_path / 't.csv'}:row 2: output: content must be a string, got null" in lines
    assert len(lines) == 6


def test_column_mapping_and_messages_as_json_text(tmp_path):
    pd.DataFrame({"question": ["Hi?"], "response": ["Hello."]}).to_csv(tmp_path / "q.csv", index=False)
    data = read_source(Source(str(tmp_path / "q.csv"), columns={"question": "instruction", "response": "output"}))
    assert as_pairs(data.conversations()) == [[("user", "Hi?"), ("assistant", "Hello.")]]
    chat = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."}]
    pd.DataFrame({"conversation": [json.dumps(chat)]}).to_csv(tmp_path / "m.csv", index=False)
    data = read_source(Source(str(tmp_path / "m.csv"), columns={"conversation": "messages"}))
    assert as_pairs(data.conversations()) == [[("user", "A?"), ("assistant", "B.")]]


@pytest.mark.parametrize("case, expected", [
    ("wrong_type", r"t\.parquet: column 'output' holds int64 values, expected text"),
    ("missing_column", r"t\.parquet: missing column 'output' \(alpaca format; columns: instruction\)"),
    ("unknown_columns", r"t\.parquet: cannot detect the record format: .*first record's fields: a, b"),
    ("mapped_missing", r"t\.parquet: columns maps 'question', but there is no such column"),
    ("empty", r"t\.parquet: no records \(it is empty\)"),
    ("no_split", r"saved: the saved dataset has no split 'test' \(splits: train\); set split"),
    ("unsupported", r"t\.txt: unsupported file type '\.txt'"),
    ("no_match", r"nothing-\*\.parquet: no file matches this pattern"),
])
def test_source_level_problems_are_one_line(tmp_path, case, expected):
    path, source = str(tmp_path / "t.parquet"), {}
    if case == "wrong_type":
        pd.DataFrame({"instruction": ["a"], "output": [1]}).to_parquet(path)
    elif case == "missing_column":
        pd.DataFrame({"instruction": ["a"]}).to_parquet(path)
        source["format"] = "alpaca"
    elif case == "unknown_columns":
        pd.DataFrame({"a": ["x"], "b": ["y"]}).to_parquet(path)
    elif case == "mapped_missing":
        pd.DataFrame({"instruction": ["a"], "output": ["b"]}).to_parquet(path)
        path = Source(path, columns={"question": "instruction"})
    elif case == "empty":
        pd.DataFrame({"instruction": pd.Series([], dtype=str), "output": pd.Series([], dtype=str)}).to_parquet(path)
    elif case == "no_split":
        datasets.DatasetDict({"train": datasets.Dataset.from_list([alpaca(1)])}).save_to_disk(str(tmp_path / "saved"))
        path = Source(str(tmp_path / "saved"), split="test")
    elif case == "unsupported":
        (tmp_path / "t.txt").write_text("hello")
        path = str(tmp_path / "t.txt")
    elif case == "no_match":
        path = str(tmp_path / "nothing-*.parquet")
    problems = read_source(path, **source).problems
    assert len(problems) == 1 and len(str(problems[0]).splitlines()) == 1
    assert re.search(expected, str(problems[0])), str(problems[0])


def test_hub_id_without_network_is_one_line():
    # This machine has no route to huggingface.co: the real lookup must fail fast, in one line.
    [problem] = read_source(Source("someorg/somedata", split="train")).problems
    assert str(problem).startswith("someorg/somedata[train]: cannot load the Hub dataset")
    assert "no network access" in str(problem) or "offline" in str(problem)
    assert len(str(problem).splitlines()) == 1


def test_batch_encoder_matches_encode_conversation(tiny_tokenizer):
    rng = random.Random(0)
    words = ["the", "a", " ", "\n", "ünï", "漢字", "🙂", "loss", "  time", "x\n\n"]

    def text() -> str:
        return "w " + " ".join(rng.choices(words, k=rng.randint(1, 12))) + rng.choice(["", " ", "\n"])

    conversations = []
    for _ in range(60):
        chat = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            chat += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        conversations.append(chat)
    batch = {"messages": conversations, "row": list(range(60)), "part": [0] * 60}
    fast = encode_batch(batch, tokenizer=tiny_tokenizer, chat_template=None, max_length=10_000, truncation="cut",
                        labelling={"masking": "assistant"})
    for i, chat in enumerate(conversations):
        expected = encode_conversation(chat, tiny_tokenizer)
        assert fast["input_ids"][i] == expected["input_ids"] and fast["labels"][i] == expected["labels"], i


def test_worker_processes_read_and_encode_the_same(tmp_path, tiny_model_dir, monkeypatch):
    from lightning_ft.data import encode, sources

    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}) + "\n"
        for i in range(40)) + "{bad\n")
    results = []
    for procs in (None, 2):
        monkeypatch.setattr(encode, "_PARALLEL_FROM", 0 if procs else 10**9)
        monkeypatch.setattr(sources, "_PARALLEL_FROM", 0 if procs else 10**9)
        data = ChatDataModule(str(tmp_path / "t.jsonl"), tokenizer=tiny_model_dir, num_proc=procs,
                              encode_cache=False, checks="off")
        with pytest.raises(DataError, match=r"t\.jsonl:41: invalid JSON"):
            data.setup("fit")
        data = ChatDataModule(sources=[Source(str(tmp_path / "t.jsonl"))], tokenizer=tiny_model_dir,
                              num_proc=procs, encode_cache=False, checks="off")
        data._read()["train"][0].problems.clear()  # train on the good records
        data.setup("fit")
        results.append(list(data.train_examples))
    assert results[0] == results[1] and len(results[0]) == 40
