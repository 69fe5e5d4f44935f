"""Preference pairs through the data layer's sources: Parquet, CSV, saved datasets, globs and column mappings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from pref_helpers import pair_record, write_pair_file

from lightning_ft.cli import console_main
from lightning_ft.data.formats import DataError
from lightning_ft.data.sources import Source
from lightning_ft.preference import PreferenceDataModule
from lightning_ft.preference.data import read_pairs, scan_pairs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "preference_quickstart.yaml")


def _as_messages(record: dict) -> dict:
    """The explicit-prompt record as two full conversations (UltraFeedback style)."""
    return {side: [*record["prompt"], {"role": "assistant", "content": record[side]}] for side in ("chosen", "rejected")}


def test_parquet_rows_become_pairs_and_a_bad_row_is_named(tmp_path):
    records = [pair_record(i) for i in range(4)]
    records[2] = {**records[2], "rejected": None}  # an empty cell
    path = str(tmp_path / "pairs.parquet")
    Dataset.from_list(records).to_parquet(path)
    pairs, problems = scan_pairs(path)
    assert [p.source for p in pairs] == [f"{path}:row 0", f"{path}:row 1", f"{path}:row 3"]
    assert pairs[1].prompt == tuple(records[1]["prompt"]) and pairs[1].chosen == records[1]["chosen"]
    assert [str(p) for p in problems] == [f"{path}:row 2: rejected: missing field 'rejected' (preference records "
                                          "need chosen and rejected; has: prompt, chosen)"]


def test_saved_dataset_split_with_a_column_mapping(tmp_path):
    rows = [{"good": c["chosen"], "bad": c["rejected"]} for c in map(_as_messages, map(pair_record, range(3)))]
    rows[1]["bad"] = [rows[1]["bad"][0], {"role": "user", "content": "not a reply"}]  # ends with a user turn
    saved = str(tmp_path / "saved")
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(saved)
    source = Source(saved, split="test", columns={"good": "chosen", "bad": "rejected"})
    pairs, problems = scan_pairs(source)
    assert [p.source for p in pairs] == [f"{saved}[test]:row 0", f"{saved}[test]:row 2"]
    assert pairs[1].rejected == pair_record(2)["rejected"] and pairs[1].prompt == tuple(pair_record(2)["prompt"])
    with pytest.raises(DataError, match=rf"{saved}\[test\]:row 1: rejected\[1\].role: a side must end with the "
                                        "assistant reply"):
        read_pairs(source)
    assert "has no split 'train'" in str(scan_pairs(Source(saved))[1][0])


def test_csv_message_lists_as_json_text_and_globs(tmp_path):
    record = pair_record(0)
    Dataset.from_list([{**record, "prompt": json.dumps(record["prompt"])}]).to_csv(str(tmp_path / "a.csv"))
    write_pair_file(tmp_path / "b.jsonl", 2, start=5)
    pairs = read_pairs(str(tmp_path / "*.*"))
    assert [p.source for p in pairs] == [f"{tmp_path}/a.csv:row 0", f"{tmp_path}/b.jsonl:1", f"{tmp_path}/b.jsonl:2"]
    assert pairs[0].prompt == tuple(record["prompt"])


def test_datamodule_reads_sources_and_stops_on_a_bad_row(tmp_path, tiny_model_dir):
    train = str(tmp_path / "train.parquet")
    Dataset.from_list([pair_record(i) for i in range(8)]).to_parquet(train)
    saved = str(tmp_path / "val")
    Dataset.from_list([{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                       for r in map(pair_record, range(20, 23))]).save_to_disk(saved)
    data = PreferenceDataModule(train, Source(saved, columns={"question": "prompt"}), tokenizer=tiny_model_dir,
                                batch_size=2, max_length=64)
    data.setup("fit")
    assert len(data.train_examples) == 8 and len(data.val_examples) == 3
    assert next(iter(data.val_dataloader()))["input_ids"].shape[0] == 4
    Dataset.from_list([pair_record(0), {**pair_record(1), "chosen": ""}]).to_parquet(train)
    with pytest.raises(DataError, match=rf"{train}:row 1: chosen: .*empty assistant message"):
        PreferenceDataModule(train, tokenizer=tiny_model_dir).setup("fit")
    with pytest.raises(ValueError, match=r"val_path: .*weight=-1 must be a number > 0"):
        PreferenceDataModule(train, Source(saved, weight=-1))


def test_check_data_takes_a_source_with_columns_from_the_command_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = str(tmp_path / "pairs.parquet")
    rows = [{"q": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in map(pair_record, range(6))]
    rows[4]["rejected"] = rows[4]["chosen"]
    Dataset.from_list(rows).to_parquet(path)
    source = json.dumps({"path": path, "columns": {"q": "prompt"}})
    code = console_main(["preference", "check-data", "--config", CONFIG, "--model.model_name", tiny_model_dir,
                         "--data.train_path", source, "--data.val_path", "null", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["stats"]["train"]["pairs"] == 6 and report["files"]["train"] == path
    identical = [f for f in report["findings"] if f["code"] == "identical-pair"]
    assert [f["location"] for f in identical] == [f"{path}:row 4"]
