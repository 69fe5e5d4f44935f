"""Records -> conversations: every format, auto-detection, and bad data reported with file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ft.data.formats import (
    Conversation,
    DataError,
    DataProblem,
    check_conversation,
    read_conversations,
    scan_file,
)


def write_jsonl(path: Path, *rows: object) -> str:
    """Write rows (dicts are JSON-encoded, strings written verbatim) one per line."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def roles_and_contents(conversation: Conversation) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in conversation.messages]


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


# --- formats -----------------------------------------------------------------------------------------


def test_messages_multi_turn_with_system(tmp_path):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ], "id": 7}  # extra metadata fields are ignored
    [conversation] = read_conversations(write_jsonl(tmp_path / "train.jsonl", record))
    assert roles_and_contents(conversation) == [
        ("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6")
    ]
    assert conversation.source.endswith("train.jsonl:1")


def test_alpaca_with_and_without_input_and_system(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!", "system": "You are terse."},
        {"instruction": "Count.", "output": "1 2 3", "system": ""},  # blank system means none
    )
    with_input, without_input, with_system, blank_system = read_conversations(path)
    assert roles_and_contents(with_input) == [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")]
    assert roles_and_contents(without_input) == [("user", "Say hi."), ("assistant", "Hi!")]
    assert roles_and_contents(with_system) == [("system", "You are terse."), ("user", "Say bye."),
                                               ("assistant", "Bye!")]
    assert roles_and_contents(blank_system) == [("user", "Count."), ("assistant", "1 2 3")]


def test_sharegpt_speaker_names(tmp_path):
    record = {"conversations": [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Bye"},
        {"from": "model", "value": "Goodbye"},
    ]}
    [conversation] = read_conversations(write_jsonl(tmp_path / "sg.jsonl", record))
    assert [role for role, _ in roles_and_contents(conversation)] == [
        "system", "user", "assistant", "user", "assistant"
    ]


def test_sharegpt_unknown_speaker(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    with pytest.raises(DataError, match=r"sg\.jsonl:1: conversations\[1\]\.from: unknown speaker 'bot' "
                                        r"\(allowed: human, user, gpt, assistant, model, system\)"):
        read_conversations(write_jsonl(tmp_path / "sg.jsonl", record))


def test_prompt_completion_strings_and_lists(tmp_path):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        {"prompt": "Say hello.", "completion": "Hello."},
        {"prompt": [{"role": "system", "content": "Be formal."}, {"role": "user", "content": "Greet me."}],
         "completion": [{"role": "assistant", "content": "Good day."}]},
    )
    strings, lists = read_conversations(path)
    assert roles_and_contents(strings) == [("user", "Say hello."), ("assistant", "Hello.")]
    assert roles_and_contents(lists) == [("system", "Be formal."), ("user", "Greet me."), ("assistant", "Good day.")]


def test_auto_detect_uses_first_recognisable_record(tmp_path):
    # The first record is broken JSON; detection looks at the first record that parses and matches.
    path = write_jsonl(tmp_path / "a.jsonl", "{not json", {"instruction": "Hi", "output": "Hello"})
    conversations, problems = scan_file(path)
    assert [roles_and_contents(c) for c in conversations] == [[("user", "Hi"), ("assistant", "Hello")]]
    assert [str(p) for p in problems] == [f"{path}:1: invalid JSON: Expecting property name enclosed in "
                                          "double quotes (column 2)"]


def test_explicit_format_overrides_detection(tmp_path):
    # Has both alpaca and prompt/completion fields; auto picks alpaca, the override picks prompt/completion.
    record = {"instruction": "I", "output": "O", "prompt": "P", "completion": "C"}
    path = write_jsonl(tmp_path / "both.jsonl", record)
    assert roles_and_contents(read_conversations(path)[0])[0] == ("user", "I")
    assert roles_and_contents(read_conversations(path, format="prompt_completion")[0])[0] == ("user", "P")
    with pytest.raises(DataError, match=r"both\.jsonl:1: messages: missing field 'messages' \(messages format; "
                                        r"record has: instruction, output, prompt, completion\)"):
        read_conversations(path, format="messages")


def test_default_system_prompt_only_where_missing(tmp_path):
    own = {"messages": [{"role": "system", "content": "Mine."}, *CHAT["messages"]]}
    path = write_jsonl(tmp_path / "t.jsonl", CHAT, own)
    plain, with_own = read_conversations(path, system_prompt="Default.")
    assert roles_and_contents(plain)[0] == ("system", "Default.")
    assert roles_and_contents(with_own)[:2] == [("system", "Mine."), ("user", "Hi")]


def test_json_list_file_uses_record_numbers(tmp_path):
    path = tmp_path / "data.json"
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
    path.write_text(json.dumps([CHAT, bad], indent=2))
    conversations, problems = scan_file(path)
    assert len(conversations) == 1 and conversations[0].source == f"{path}:record 1"
    assert [str(p) for p in problems] == [f"{path}:record 2: messages[1].content: empty assistant message"]
    assert problems[0].unit == "record" and problems[0].line == 2


# --- bad data ----------------------------------------------------------------------------------------


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", CHAT, '{"messages": [', CHAT)
    with pytest.raises(DataError, match=r"1 problem in the data:\n  .*train\.jsonl:2: invalid JSON"):
        read_conversations(path)


def test_unknown_role_names_the_allowed_ones(tmp_path):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                           {"role": "user", "content": "?"}, {"role": "bot", "content": "!"}]}
    path = write_jsonl(tmp_path / "train.jsonl", CHAT, CHAT, record)
    with pytest.raises(DataError, match=r"train\.jsonl:3: messages\[3\]\.role: unknown role 'bot' "
                                        r"\(allowed: system, user, assistant\)"):
        read_conversations(path)


def test_no_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", {"messages": [{"role": "user", "content": "Hi"}]})
    with pytest.raises(DataError, match=r"t\.jsonl:1: messages: no assistant message: nothing to train on"):
        read_conversations(path)


def test_empty_assistant_message(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", {"prompt": "Hi", "completion": "  \n"})
    with pytest.raises(DataError, match=r"t\.jsonl:1: completion: empty assistant message"):
        read_conversations(path)


def test_wrong_field_name(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", CHAT, {"mesages": CHAT["messages"]})
    with pytest.raises(DataError, match=r"t\.jsonl:2: messages: missing field 'messages' "
                                        r"\(messages format; record has: mesages\)"):
        read_conversations(path)


def test_wrong_types(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        CHAT,
        {"messages": "Hi"},
        {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]},
        [1, 2],
    )
    _, problems = scan_file(path)
    assert [str(p).split(": ", 1)[1] for p in problems] == [
        "messages: must be a list of messages, got a string",
        "messages[0].content: content must be a string, got a list",
        "messages[0]: missing field 'content' (has: role)",
        "expected a JSON object, got a list",
    ]


@pytest.mark.parametrize("content", ["", "\n\n", "[]", "  []  "])
def test_empty_file(tmp_path, content):
    name = "t.json" if "[" in content else "t.jsonl"
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=r"t\.jsonl?: no records \(the file is empty\)"):
        read_conversations(tmp_path / name)


def test_file_level_problems(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "ok"}\n'.encode("latin-1"))
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "obj.json").write_text(json.dumps(CHAT))
    (tmp_path / "lines.json").write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n")
    (tmp_path / "nothing.jsonl").write_text(json.dumps({"question": "?", "answer": "!"}) + "\n")
    expected = {
        "missing.jsonl": "file not found",
        "": "is a directory, expected a .jsonl or .json file",
        "latin1.jsonl": "is not UTF-8 text (undecodable byte at offset 15); save it as UTF-8",
        "data.csv": "unsupported file type '.csv' (allowed: .jsonl with one record per line, .json with a list "
                    "of records)",
        "obj.json": "a .json file must hold a list of records, got an object",
        "lines.json": "invalid JSON: Extra data (column 1) (one record per line belongs in a .jsonl file)",
        "nothing.jsonl": "cannot detect the record format: no record has the fields of one (first record's "
                         "fields: question, answer; formats need messages: messages; sharegpt: conversations; "
                         "alpaca: instruction, output; prompt_completion: prompt, completion)",
    }
    for name, message in expected.items():
        conversations, problems = scan_file(tmp_path / name)
        assert conversations == [] and len(problems) == 1, name
        assert problems[0].message == message
    assert str(scan_file(tmp_path / "missing.jsonl")[1][0]) == f"{tmp_path / 'missing.jsonl'}: file not found"
    assert str(scan_file(tmp_path / "lines.json")[1][0]).startswith(f"{tmp_path / 'lines.json'}:2: invalid JSON")


def test_every_bad_record_reported_at_once(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        CHAT,
        {"messages": [{"role": "assistant", "content": "Hello"}]},
        "",  # blank lines are skipped but still counted
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"},
                      {"role": "user", "content": "B"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"},
                      {"role": "assistant", "content": ""}]},
    )
    original = Path(path).read_bytes()
    with pytest.raises(DataError) as caught:
        read_conversations(path)
    assert str(caught.value).splitlines() == [
        "4 problems in the data:",
        f"  {path}:2: messages[0].role: expected a user message here (after an optional system message, "
        "turns alternate user, assistant), got 'assistant'",
        f"  {path}:4: messages[2].role: the last message must be from the assistant, got 'user'",
        f"  {path}:5: messages[1].role: a system message may only come first",
        f"  {path}:5: messages[2].content: empty assistant message",
    ]
    assert all(isinstance(p, DataProblem) for p in caught.value.problems)
    assert Path(path).read_bytes() == original  # user files are never modified


def test_error_list_is_capped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", *["{bad"] * 60)
    with pytest.raises(DataError, match=r"60 problems in the data:\n(  .*\n){50}  \.\.\. and 10 more$"):
        read_conversations(path)


def test_check_conversation_rules():
    assert check_conversation(CHAT["messages"]) == []
    assert check_conversation([]) == ["conversation is empty"]
    assert check_conversation([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": 3}]) == [
        "messages[1].role: expected an assistant message here (after an optional system message, turns "
        "alternate user, assistant), got 'user'",
        "messages[2].content: content must be a string, got a number",
    ]


def test_deeply_nested_line_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100000 + "\n" + json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    conversations, problems = scan_file(str(path))
    assert [str(p) for p in problems] == [f"{path}:1: invalid record: JSON nested too deeply"]
    assert len(conversations) == 1


# --- per-message opt-out ------------------------------------------------------------------------------


def test_train_false_and_weight_zero_survive_parsing(tmp_path):
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", "train": False},
             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "4", "train": True}]
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo", "weight": 0},
                                  {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello!", "weight": 1}]}
    [first] = read_conversations(write_jsonl(tmp_path / "train.jsonl", {"messages": turns}))
    [second] = read_conversations(write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt))
    assert first.messages[1] == {"role": "assistant", "content": "5", "train": False}
    assert first.messages[3] == {"role": "assistant", "content": "4"}
    assert second.messages[1]["train"] is False and "train" not in second.messages[3]


def test_bad_opt_out_values_are_reported_with_their_field(tmp_path):
    record = {"messages": [{"role": "user", "content": "Hi", "train": False},
                           {"role": "assistant", "content": "Yo", "weight": 0.5}]}
    other = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "train": "no"}]}
    _, problems = scan_file(write_jsonl(tmp_path / "t.jsonl", record, other))
    assert [str(problem).split("t.jsonl:")[1] for problem in problems] == [
        "1: messages[0]: only an assistant message can opt out of training (train: false / weight: 0)",
        "1: messages[1].weight: must be 0 (not trained) or 1, got 0.5",
        "2: messages[1].train: must be true or false, got a string",
    ]
