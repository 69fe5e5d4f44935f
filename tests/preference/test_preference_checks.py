"""Preference data checks: identical sides, duplicates, contradictions, leakage and length bias, and check-data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pref_helpers import pair_record, write_pair_file, write_pairs

from lightning_ft.cli import console_main
from lightning_ft.commands.check_pairs import is_preference_config
from lightning_ft.preference.checks import find_length_bias, length_bias, lint_pairs
from lightning_ft.preference.data import read_pairs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "preference_quickstart.yaml")


def _codes(findings):
    return [(f.severity, f.code) for f in findings]


def test_identical_sides_duplicates_and_contradictions(tmp_path):
    same = {**pair_record(0), "rejected": pair_record(0)["chosen"].upper()}
    swapped = {**pair_record(1), "chosen": pair_record(1)["rejected"], "rejected": pair_record(1)["chosen"]}
    path = write_pairs(tmp_path / "p.jsonl", [same, pair_record(1), pair_record(1), swapped])
    findings = lint_pairs({"train": read_pairs(path)})
    by_code = {f.code: f for f in findings}
    assert by_code["identical-pair"].location == f"{path}:1"
    assert "identical up to case and punctuation" in by_code["identical-pair"].message
    assert by_code["duplicate-pair"].location == f"{path}:3" and f"{path}:2" in by_code["duplicate-pair"].message
    assert by_code["contradicting-pair"].location == f"{path}:4"


def test_length_bias_is_a_number_and_a_warning_when_systematic(tmp_path):
    biased = [{**pair_record(i), "chosen": f"It is {i + 1}, and here is a long explanation why.", "rejected": "No."}
              for i in range(8)]
    pairs = read_pairs(write_pairs(tmp_path / "biased.jsonl", biased))
    assert length_bias(pairs)[:2] == (1.0, 8)
    finding, = find_length_bias(pairs)
    assert finding.severity == "warning" and "length bias +1.00" in finding.message and "100%" in finding.message
    balanced = read_pairs(write_pair_file(tmp_path / "balanced.jsonl", 8))  # rejected alternates longer/shorter
    finding, = find_length_bias(balanced)
    assert finding.severity == "info" and "length bias +0.00" in finding.message


def test_validation_prompts_leaking_from_training(tmp_path):
    train = read_pairs(write_pair_file(tmp_path / "train.jsonl", 4))
    val = read_pairs(write_pair_file(tmp_path / "val.jsonl", 2, start=3))
    leaks = [f for f in lint_pairs({"train": train, "val": val}) if f.code == "leakage"]
    assert [f.location for f in leaks] == [f"{tmp_path}/val.jsonl:1"]


def test_preference_configs_are_recognised():
    assert is_preference_config(["--config", CONFIG])
    assert is_preference_config(["--config", str(ROOT / "configs/quickstart.yaml"), "--model.loss=ipo"])
    assert not is_preference_config(["--config", str(ROOT / "configs/quickstart.yaml")])


def _check_data(capsys, tiny_model_dir, train_path, *extra):
    code = console_main(["check-data", "--config", CONFIG, "--model.model_name", tiny_model_dir,
                         "--data.train_path", train_path, "--data.val_path", "null", "--json", *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def test_check_data_reports_identical_and_length_biased_files(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    same = write_pairs(tmp_path / "same.jsonl", [{**pair_record(i), "rejected": pair_record(i)["chosen"]}
                                                 for i in range(3)])
    code, report, _ = _check_data(capsys, tiny_model_dir, same)
    assert code == 0 and [f["code"] for f in report["findings"]].count("identical-pair") == 3
    biased = write_pairs(tmp_path / "biased.jsonl", [{**pair_record(i), "rejected": "No."} for i in range(10)])
    code, report, _ = _check_data(capsys, tiny_model_dir, biased, "--strict")
    assert code == 1 and report["stats"]["train"]["length_bias"] == 1.0
    assert any(f["code"] == "length-bias" and f["severity"] == "error" for f in report["findings"])


def test_check_data_names_a_malformed_record_by_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_pairs(tmp_path / "bad.jsonl", [pair_record(0), {"prompt": "Hi", "chosen": "x", "rejected": ""}])
    code, report, _ = _check_data(capsys, tiny_model_dir, path)
    assert code == 1
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert errors[0]["location"] == f"{path}:2" and "rejected" in errors[0]["message"]


@pytest.mark.parametrize("command", [["preference", "check-data"], ["check-data"]])
def test_both_entry_points_check_pairs(tmp_path, tiny_model_dir, capsys, monkeypatch, command):
    monkeypatch.chdir(ROOT)
    path = write_pair_file(tmp_path / "ok.jsonl", 6)
    code = console_main([*command, "--config", CONFIG, "--model.model_name", tiny_model_dir,
                         "--data.train_path", path, "--data.val_path", "null"])
    out = capsys.readouterr().out
    assert code == 0 and "Preference data" in out and "OK: 0 errors" in out
