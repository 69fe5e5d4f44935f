"""ChatDataModule on small files with the tiny tokenizer: setup, splits, truncation, and errors up front."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOKENIZER_DIR

from lightning_ft.data import encode
from lightning_ft.data.collate import IGNORE_INDEX, encode_conversations
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.data.formats import DataError


def chat(index: int, answer_words: int = 3) -> dict:
    return {"messages": [
        {"role": "user", "content": f"Question number {index}?"},
        {"role": "assistant", "content": " ".join(["answer"] * answer_words) + f" {index}."},
    ]}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(20)])


def make(train_path, **kwargs) -> ChatDataModule:
    kwargs.setdefault("tokenizer", TINY_TOKENIZER_DIR)
    data = ChatDataModule(train_path, **kwargs)
    data.prepare_data()
    data.setup("fit")
    return data


def first_user_text(data: ChatDataModule, examples) -> list[str]:
    tokenizer = data.tokenizer_obj
    return [tokenizer.decode(example["input_ids"]).split("Question number ")[1].split("?")[0] for example in examples]


def test_setup_encodes_and_batches(train_file, tmp_path, caplog):
    val = write_jsonl(tmp_path / "val.jsonl", [chat(100), chat(101)])
    with caplog.at_level(logging.INFO):
        data = make(train_file, val_path=val, batch_size=8, pad_to_multiple_of=8)
    assert data.stats["train_conversations"] == 20 and data.stats["val_conversations"] == 2
    assert data.stats["conversations"] == 22 and data.stats["truncated"] == data.stats["dropped"] == 0
    assert data.stats["tokens"] == sum(len(e["input_ids"]) for e in data.train_examples + data.val_examples)
    assert 0 < data.stats["trained_tokens"] < data.stats["tokens"]
    assert "Data: 20 train + 2 val conversations" in caplog.text
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert len(data.val_dataloader()) == 1 and len(data.test_dataloader()) == 1


def test_train_shuffle_is_seeded(train_file):
    orders = [[batch["input_ids"].tolist() for batch in make(train_file, seed=s).train_dataloader()]
              for s in (1, 1, 2)]
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_val_fraction_split_is_deterministic(train_file):
    first, again, other = (make(train_file, val_fraction=0.2, seed=s) for s in (7, 7, 8))
    held_out = first_user_text(first, first.val_examples)
    assert len(held_out) == 4 and first.stats["train_conversations"] == 16
    assert held_out == first_user_text(again, again.val_examples)
    assert held_out != first_user_text(other, other.val_examples)
    assert not set(held_out) & set(first_user_text(first, first.train_examples))


def test_no_validation_data_gives_empty_loader(train_file):
    data = make(train_file)
    assert data.val_dataloader() == [] and data.stats["val_conversations"] == 0


def test_cut_truncation_counts(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(1), chat(2, answer_words=40), chat(3, answer_words=40)])
    short = make(path, max_length=10_000)
    limit = max(len(e["input_ids"]) for e in short.train_examples) - 5
    with pytest.warns(UserWarning, match=r"2 truncated to max_length=\d+ \(\d+ trained tokens lost\)"):
        data = make(path, max_length=limit)
    assert data.stats["truncated"] == 2 and data.stats["dropped"] == 0
    assert data.stats["trained_tokens_lost"] == short.stats["trained_tokens"] - data.stats["trained_tokens"] > 0
    assert max(len(e["input_ids"]) for e in data.train_examples) == limit


def test_drop_truncation(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(1), chat(2, answer_words=40), chat(3)])
    with pytest.warns(UserWarning, match=r"Data: 2 train \+ 0 val conversations, .*; 0 truncated .*, 1 dropped"):
        data = make(path, max_length=40, truncation="drop")
    assert data.stats["dropped"] == 1 and data.stats["train_conversations"] == 2 and data.stats["truncated"] == 0


def test_drop_everything_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(1, answer_words=40)])
    with pytest.raises(ValueError, match=r"truncation='drop' dropped them all"):
        make(path, max_length=20, truncation="drop")


def test_cut_that_leaves_nothing_trained_names_the_source(tmp_path):
    long_question = {"messages": [{"role": "user", "content": "why " * 80},
                                  {"role": "assistant", "content": "Because."}]}
    path = write_jsonl(tmp_path / "t.jsonl", [chat(1), long_question])
    with pytest.raises(DataError, match=r"t\.jsonl:2: conversation yields no trained token after truncation to "
                                        r"max_length=60 \(raise max_length, or set truncation='drop'"):
        make(path, max_length=60)


def test_bad_data_raises_in_prepare_data_before_setup(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(1), {"messages": [{"role": "bot", "content": "x"}]}])
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "Hi", "completion": ""}\n')
    data = ChatDataModule(train, val_path=str(val), tokenizer="/no/such/model")  # tokenizer is not touched yet
    with pytest.raises(DataError) as caught:
        data.prepare_data()
    assert [str(problem) for problem in caught.value.problems] == [
        f"{train}:2: messages[0].role: unknown role 'bot' (allowed: system, user, assistant)",
        f"{train}:2: messages: no assistant message: nothing to train on",
        f"{val}:1: completion: empty assistant message",
    ]
    assert data.stats == {} and data.tokenizer_obj is None


def test_tokenizer_object_can_be_assigned(train_file, tiny_tokenizer):
    data = ChatDataModule(train_file)
    data.tokenizer_obj = tiny_tokenizer
    data.setup("fit")
    assert data.stats["train_conversations"] == 20


def test_missing_tokenizer_and_data(train_file):
    with pytest.raises(ValueError, match=r"needs a tokenizer: set `tokenizer`"):
        ChatDataModule(train_file).setup("fit")
    with pytest.raises(ValueError, match=r"has no data: set train_path"):
        ChatDataModule(tokenizer=TINY_TOKENIZER_DIR).prepare_data()


def test_argument_validation_reports_everything():
    with pytest.raises(ValueError) as caught:
        ChatDataModule("t.jsonl", val_path="v.jsonl", val_fraction=0.1, format="csv", batch_size=0,
                       max_length=-1, truncation="wrap", pad_to_multiple_of=0, num_workers=-2, system_prompt=" ")
    assert str(caught.value).splitlines() == [
        "Invalid ChatDataModule arguments:",
        "  format='csv': must be one of: auto, messages, alpaca, sharegpt, prompt_completion",
        "  system_prompt=' ': must be a non-blank string, or None for no default system message",
        "  batch_size=0: must be an integer >= 1",
        "  max_length=-1: must be an integer >= 1",
        "  truncation='wrap': must be one of: cut, drop",
        "  pad_to_multiple_of=0: must be an integer >= 1, or None",
        "  num_workers=-2: must be an integer >= 0",
        "  val_fraction=0.1: must be 0 when val_path is set (use a validation file or a split of the training "
        "file, not both)",
    ]
    with pytest.raises(ValueError, match=r"val_fraction=1.0: must be a number in \[0, 1\)"):
        ChatDataModule("t.jsonl", val_fraction=1.0)


def test_val_fraction_too_large_for_the_data(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(1)])
    with pytest.raises(ValueError, match=r"val_fraction=0.5 of 1 training conversations leaves none to train on"):
        make(path, val_fraction=0.5)


def test_dataloader_workers_can_pickle_the_collator(train_file):
    data = make(train_file, num_workers=1, batch_size=5)
    batches = list(data.train_dataloader())
    assert len(batches) == 4 and all(isinstance(batch["input_ids"], torch.Tensor) for batch in batches)


def test_masking_stop_tokens_and_reasoning_reach_the_encoder(tmp_path, monkeypatch):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "train": False},
                           {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]}
    path = write_jsonl(tmp_path / "t.jsonl", [record])

    def trained(**kwargs) -> str:
        data = make(path, encode_cache=False, **kwargs)
        [example] = data.train_examples
        return data.tokenizer_obj.decode([t for t in example["labels"] if t != IGNORE_INDEX])

    assert trained() == "Hello there.<|im_end|>"  # the opted-out reply stays masked
    data = make(path, encode_cache=False, masking="all")
    ids, labels = data.train_examples[0]["input_ids"], data.train_examples[0]["labels"]
    assert data.tokenizer_obj.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX]) == "Yo<|im_end|>"
    seen = []
    monkeypatch.setattr(encode, "encode_conversations",
                        lambda *a, **kw: seen.append(kw) or encode_conversations(*a, **kw))
    assert trained(stop_tokens=["<|endoftext|>"], train_reasoning=False, masking="last_assistant") == "Hello there.<|im_end|>"
    assert seen == [{"chat_template": None, "stop_tokens": ["<|endoftext|>"], "masking": "last_assistant",
                     "train_reasoning": False}]
    with pytest.raises(ValueError, match=r"stop_tokens=\[1.5\]: must be a list of token ids or strings, or None\n"
                                         r"  masking='some': must be one of: assistant, last_assistant, all"):
        ChatDataModule(path, masking="some", stop_tokens=[1.5])


def test_stop_tokens_default_to_the_models_generation_config(tiny_model_dir, tmp_path):
    (Path(tiny_model_dir) / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    data = ChatDataModule(str(tmp_path / "t.jsonl"), tokenizer=tiny_model_dir)
    assert data.labelling() == {"stop_tokens": [2, 0], "masking": "assistant", "train_reasoning": True}
    assert ChatDataModule("t.jsonl", tokenizer=TINY_TOKENIZER_DIR).labelling()["stop_tokens"] == []
