"""Preference records: both shapes parse, bad records are named by file, line and field, only the final reply is scored."""

from __future__ import annotations

import json

import pytest
from pref_helpers import pair_record, write_pairs

from lightning_ft.data.collate import IGNORE_INDEX, EmptyLabelsError
from lightning_ft.data.formats import DataError
from lightning_ft.preference.data import collate_pairs, encode_pair, parse_record, read_pairs, scan_pairs

PROMPT = [{"role": "user", "content": "Hi"}]


def _scored(example, tokenizer):
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_explicit_prompt_with_strings_and_message_lists():
    strings, _ = parse_record({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."})
    lists, _ = parse_record({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Hello!"}],
                             "rejected": [{"role": "assistant", "content": "Go away."}]})
    assert strings.prompt == lists.prompt == ({"role": "user", "content": "Hi"},)
    assert (strings.chosen, strings.rejected) == (lists.chosen, lists.rejected) == ("Hello!", "Go away.")


def test_full_conversations_sharing_a_prefix():
    pair, problems = parse_record({"chosen": [*PROMPT, {"role": "assistant", "content": "Hello!"}],
                                   "rejected": [*PROMPT, {"role": "assistant", "content": "Go away."}]})
    assert problems == [] and pair.prompt == tuple(PROMPT) and pair.rejected == "Go away."


@pytest.mark.parametrize("record, field, text", [
    ({"prompt": "Hi", "chosen": "Hello"}, "rejected", "missing field 'rejected'"),
    ({"prompt": "Hi", "chosen": "", "rejected": "x"}, "chosen", "empty assistant message"),
    ({"prompt": "Hi", "chosen": "x", "rejected": "   "}, "rejected", "empty assistant message"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "x"}, "chosen", "must be a string or a non-empty list"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
     "rejected", "the prompt differs between sides"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, "chosen[0].role",
     "must end with the assistant reply"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt", "expected a user"),
])
def test_bad_records_name_the_field(record, field, text):
    pair, problems = parse_record(record)
    assert pair is None
    assert any(f == field and text in message for f, message in problems), problems


def test_malformed_record_is_named_by_file_and_line(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", [pair_record(0), "{not json", pair_record(1),
                                                  {"prompt": "Hi", "chosen": "same"}])
    pairs, problems = scan_pairs(path)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON(.|\n)*{path}:4: rejected: missing field"):
        read_pairs(path)


def test_json_list_files_count_records(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([pair_record(0), {"prompt": "x"}]))
    with pytest.raises(DataError, match=r"pairs.json:record 2: chosen: missing field 'chosen'"):
        read_pairs(path)


def test_only_the_final_reply_and_its_stop_marker_are_scored(tiny_tokenizer):
    pair, _ = parse_record({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                       {"role": "user", "content": "Again"}], "chosen": "Hello", "rejected": "Bye"})
    encoded = encode_pair(pair, tiny_tokenizer, 256)
    assert _scored(encoded["chosen"], tiny_tokenizer) == "Hello<|im_end|>"
    assert _scored(encoded["rejected"], tiny_tokenizer) == "Bye<|im_end|>"
    first = encoded["chosen"]["labels"].index(next(t for t in encoded["chosen"]["labels"] if t != IGNORE_INDEX))
    assert encoded["chosen"]["input_ids"][:first] == encoded["rejected"]["input_ids"][:first]  # shared prompt


def test_a_reply_past_max_length_is_an_error(tiny_tokenizer):
    pair, _ = parse_record({"prompt": "word " * 50, "chosen": "a", "rejected": "b"})
    pair = type(pair)(pair.prompt, pair.chosen, pair.rejected, "pairs.jsonl:7")
    with pytest.raises(EmptyLabelsError, match=r"pairs.jsonl:7: the chosen reply starts at token \d+, past max_length=16"):
        encode_pair(pair, tiny_tokenizer, 16)


def test_collate_puts_chosen_rows_first_then_rejected(tiny_tokenizer):
    pairs = [parse_record(pair_record(i))[0] for i in range(3)]
    encoded = [encode_pair(p, tiny_tokenizer, 256) for p in pairs]
    batch = collate_pairs(encoded, pad_token_id=0)
    assert batch["input_ids"].shape[0] == 6
    for i, example in enumerate(encoded):
        for offset, side in ((0, "chosen"), (3, "rejected")):
            ids = example[side]["input_ids"]
            assert batch["input_ids"][i + offset, :len(ids)].tolist() == ids
            assert int(batch["attention_mask"][i + offset].sum()) == len(ids)
    assert "ref_logps" not in batch
    with_ref = collate_pairs([{**e, "ref_logps": [float(i), -float(i)]} for i, e in enumerate(encoded)], 0)
    assert with_ref["ref_logps"].tolist() == [0.0, 1.0, 2.0, -0.0, -1.0, -2.0]
