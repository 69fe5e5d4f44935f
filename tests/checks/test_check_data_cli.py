"""`lightning_ft check-data` end to end on hand-written files with the tiny model, and fit-time data checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import TINY_TOKENIZER_DIR
from helpers import chat_record, write_chat_file

from lightning_ft.cli import console_main, main
from lightning_ft.data import checks
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.data.formats import DataError

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def write_records(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def check_data(capsys, tiny_model_dir, train: str, val: str | None = None, *extra: str) -> tuple[int, str, str]:
    args = ["check-data", "--config", QUICKSTART, "--model.model_name", tiny_model_dir, "--data.train_path", train]
    args += ["--data.val_path", val] if val else ["--data.val_path", "null"]
    code = console_main([*args, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def json_report(capsys, tiny_model_dir, train, val=None, *extra):
    code, out, _ = check_data(capsys, tiny_model_dir, train, val, "--json", "--surprise_top", "0", *extra)
    return code, json.loads(out)


def test_clean_data_reports_counts_and_exits_zero(capsys, tiny_model_dir, tmp_path):
    train, val = write_chat_file(tmp_path / "train.jsonl", 12), write_chat_file(tmp_path / "val.jsonl", 4, 50)
    code, report = json_report(capsys, tiny_model_dir, train, val)
    assert code == 0 and report["ok"] and report["counts"] == {"error": 0, "warning": 0, "info": 0}
    train_stats = report["stats"]["train"]
    assert train_stats["conversations"] == 12 and report["stats"]["val"]["conversations"] == 4
    assert train_stats["turns"] == {"system": 12, "user": 12, "assistant": 12}
    assert sum(train_stats["tokens"].values()) == train_stats["total_tokens"]
    assert 0 < train_stats["trained_tokens"] < train_stats["tokens"]["assistant"]
    assert report["surprises"] is None and report["max_length"] == 256


def test_every_bad_record_is_an_error_with_file_and_line(capsys, tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [
        chat_record(1),
        "{oops",
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ["list"]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "x"}]},
    ])
    code, report = json_report(capsys, tiny_model_dir, train)
    assert code == 1 and not report["ok"]
    errors = {(f["code"], f["location"]) for f in report["findings"] if f["severity"] == "error"}
    assert errors >= {("malformed-json", f"{train}:2"), ("unknown-role", f"{train}:3"),
                      ("missing-assistant", f"{train}:4"), ("empty-message", f"{train}:5"),
                      ("wrong-type", f"{train}:6"), ("role-order", f"{train}:7")}
    assert {location for _, location in errors} == {f"{train}:{line}" for line in range(2, 8)}
    assert report["stats"]["train"]["conversations"] == 1  # the good record is still counted


def test_duplicates_leakage_and_strict(capsys, tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [chat_record(i) for i in range(6)] + [chat_record(2)])
    val = write_records(tmp_path / "val.jsonl", [chat_record(4), chat_record(60)])
    code, report = json_report(capsys, tiny_model_dir, train, val)
    assert code == 0 and report["ok"]
    warned = [(f["code"], f["location"]) for f in report["findings"] if f["severity"] == "warning"]
    assert warned == [("exact-duplicate", f"{train}:7"), ("leakage", f"{val}:1")]
    code, report = json_report(capsys, tiny_model_dir, train, val, "--strict")
    assert code == 1 and not report["ok"] and report["counts"]["error"] == 2


def test_truncation_is_counted_at_the_configured_max_length(capsys, tiny_model_dir, tmp_path):
    long = {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Tell me a story."},
                         {"role": "assistant", "content": "Once upon a time " * 40}]}
    train = write_records(tmp_path / "train.jsonl", [chat_record(1), long])
    code, report = json_report(capsys, tiny_model_dir, train, None, "--data.max_length", "64")
    stats = report["stats"]["train"]
    assert stats["truncated"] == 1 and stats["assistant_tokens_lost"] > 0 and report["max_length"] == 64
    assert [f["code"] for f in report["findings"]] == ["truncated"] and code == 0


def test_table_output_and_surprises_on_the_tiny_model(capsys, tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [chat_record(i) for i in range(5)] + [chat_record(1)])
    code, out, _ = check_data(capsys, tiny_model_dir, train, None, "--surprise_top", "3")
    assert code == 0
    for text in ("Findings", "exact-duplicate", "trained tokens", "Most surprising to the base model", "OK: 0 errors"):
        assert text in out, text
    _, out, _ = check_data(capsys, tiny_model_dir, train, None, "--surprise_top", "3", "--json")
    surprises = json.loads(out)["surprises"]
    losses = [item["loss"] for item in surprises["top"]]
    assert surprises["scored"] == 6 and len(losses) == 3 and losses == sorted(losses, reverse=True)
    assert all(loss > 0 for loss in losses)


@pytest.mark.parametrize("kind", ["missing", "directory", "encoding"])
def test_unreadable_file_is_one_line_naming_the_path(capsys, tiny_model_dir, tmp_path, kind):
    path = tmp_path / "data.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "encoding":
        path.write_bytes(b'{"messages": "caf\xe9"}\n')
    code, out, err = check_data(capsys, tiny_model_dir, str(path))
    expected = {"missing": "file not found", "directory": "is a directory", "encoding": "is not UTF-8 text"}[kind]
    lines = [line for line in err.splitlines() if line.startswith("lightning_ft check-data")]
    assert code == 1 and out == ""
    assert len(lines) == 1 and lines[0].startswith(f"lightning_ft check-data: error: {path}: {expected}")


def test_garbage_never_crashes(capsys, tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [
        "[]", "null", "42", '"text"', "\x00\x01", "{}", '{"messages": null}', '{"messages": [null, 1, "x"]}',
        '{"messages": [{"role": null, "content": {}}]}', '{"conversations": [{"from": 5, "value": "x"}]}',
        '{"prompt": 1, "completion": [2]}', '{"instruction": "x", "output": 3, "input": []}',
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud800"}]}',
        chat_record(1),
    ])
    code, report = json_report(capsys, tiny_model_dir, train)
    assert code == 1 and report["counts"]["error"] >= 12 and report["stats"]["train"]["conversations"] >= 1


def test_absurdly_nested_json_is_a_report_line_not_a_crash(capsys, tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [chat_record(1), "[" * 100_000])
    code, out, err = check_data(capsys, tiny_model_dir, train)
    assert code == 1 and "FAILED: 1 errors" in out and "nested" in out


def test_bad_command_line_exits_two(capsys, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        console_main(["check-data", "--surprise_top", "-1"])
    assert exit_info.value.code == 2
    code, _, _ = check_data(capsys, tiny_model_dir, write_chat_file(tmp_path / "t.jsonl", 3), None, "--data.nope", "1")
    assert code == 2


def test_fit_prints_data_warnings_once(tmp_path):
    train = write_records(tmp_path / "train.jsonl", [chat_record(i) for i in range(6)] + [chat_record(2)])
    data = ChatDataModule(train, tokenizer=TINY_TOKENIZER_DIR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.prepare_data()
        data.setup("fit")
    found = [str(w.message) for w in caught if "Data checks found" in str(w.message)]
    assert len(found) == 1 and f"{train}:7: warning [exact-duplicate] identical to {train}:3" in found[0]


def test_a_second_fit_on_the_same_data_reads_the_findings_back(tmp_path, monkeypatch):
    def setup(path, **kwargs):
        data = ChatDataModule(path, tokenizer=TINY_TOKENIZER_DIR, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.setup("fit")
        return [str(w.message) for w in caught if "Data checks found" in str(w.message)]

    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    train = write_records(tmp_path / "train.jsonl", [chat_record(i) for i in range(6)] + [chat_record(2)])
    checked, lint = [], checks.lint_conversations
    monkeypatch.setattr(checks, "lint_conversations", lambda *a, **kw: checked.append(1) or lint(*a, **kw))
    first = setup(train)
    assert checked == [1] and f"{train}:7: warning [exact-duplicate] identical to {train}:3" in first[0]
    assert setup(train) == first and checked == [1]  # read back: the checks did not run again
    [stored] = (tmp_path / "cache" / "checks").iterdir()
    stored.write_text("{not json")
    assert setup(train) == first and checked == [1, 1]  # an unreadable report is checked afresh
    assert setup(train, encode_cache=False) == first and checked == [1, 1, 1]
    moved = write_records(tmp_path / "other.jsonl", [chat_record(i) for i in range(6)] + [chat_record(2)])
    assert f"{moved}:7: warning [exact-duplicate] identical to {moved}:3" in setup(moved)[0]  # locations are keyed
    assert checked == [1, 1, 1, 1]


def test_fit_with_strict_checks_stops_before_anything_is_written(tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [chat_record(i) for i in range(6)] + [chat_record(2)])
    args = ["fit", "--config", QUICKSTART, "--model.model_name", tiny_model_dir, "--data.train_path", train,
            "--data.val_path", "null", "--data.checks", "strict", "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--progress_bar.refresh_rate", "0"]
    with pytest.raises(DataError, match=r"train\.jsonl:7: warning \[exact-duplicate\] identical to .*train\.jsonl:3"):
        main(args)
    assert not (tmp_path / "runs").exists()


def test_invalid_checks_setting_is_rejected():
    with pytest.raises(ValueError, match=r"checks='loud': must be one of: warn, strict, off"):
        ChatDataModule("x.jsonl", checks="loud")


def test_one_example_is_shown_with_its_trained_spans_marked(capsys, tiny_model_dir, tmp_path):
    train = write_chat_file(tmp_path / "train.jsonl", 3)
    code, report = json_report(capsys, tiny_model_dir, train)
    assert code == 0 and report["example"] == {
        "location": f"{train}:1",
        "text": "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 0 plus one?<|im_end|>\n"
                "<|im_start|>assistant\n[[It is 1.<|im_end|>]]\n",
    }
    code, out, _ = check_data(capsys, tiny_model_dir, train, None, "--surprise_top", "0")
    assert "[[It is 1.<|im_end|>]]" in out


def test_template_without_stop_markers_and_untrained_stop_tokens_warn(capsys, tiny_model_dir, tmp_path):
    train = write_records(tmp_path / "train.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}])
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    code, report = json_report(capsys, tiny_model_dir, train, None, "--model.chat_template", plain,
                               "--data.stop_tokens", "[0]")
    found = {(f["code"], f["message"].split(":")[0]) for f in report["findings"]}
    assert found == {("no-stop-marker", "the chat template writes no stop marker after the final reply"),
                     ("no-stop-marker", "the chat template writes no stop token after replies other than the last")}
    # The given stop token is appended after the final reply, not the tokenizer's eos.
    assert report["example"]["text"] == "user: Hi\nassistant: [[Yo]]\nuser: Hi?\nassistant:[[ Hello.\n<|endoftext|>]]"
    code, out, _ = check_data(capsys, tiny_model_dir, train, None, "--surprise_top", "0", "--model.chat_template",
                              plain, "--data.stop_tokens", "[0]")
    assert "assistant:[[ Hello.\\n<|endoftext|>]]" in out  # the trained newline shows
    # A marker the template writes that is none of the model's stop tokens: generation would not stop.
    chatml_reply = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    code, report = json_report(capsys, tiny_model_dir, train, None, "--model.chat_template", chatml_reply,
                               "--data.stop_tokens", "[0]")
    assert ("stop-token-untrained", "none of the model's stop tokens ('<|endoftext|>', from its generation config) "
            "is ever trained") in {(f["code"], f["message"].split(":")[0]) for f in report["findings"]}


def test_json_report_is_alone_on_stdout_while_progress_goes_to_stderr(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A first run converts the default model and says so: with --json that line must not corrupt the report."""
    import lightning_ft.commands.check_data as command
    from lightning_ft.progress import say

    build = command.build_report

    def converting_first(cli, options):
        say("Converting SmolLM2-135M-Instruct.Q4_1.gguf to a Hugging Face model in the cache (once) ...")
        return build(cli, options)

    monkeypatch.setattr(command, "build_report", converting_first)
    code, out, err = check_data(capsys, tiny_model_dir, write_chat_file(tmp_path / "train.jsonl", 4), None, "--json",
                                "--surprise_top", "0")
    assert code == 0 and json.loads(out)["ok"] and "Converting SmolLM2" in err
