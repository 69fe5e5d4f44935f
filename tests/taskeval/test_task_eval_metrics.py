"""TaskEval's scoring and argument checks: pure functions on hand-written outputs, no model."""

from __future__ import annotations

import json
import re
import sys

import pytest

from lightning_ft.callbacks.task_eval import TaskEval, TaskRecord
from lightning_ft.json_schema import builtin_schema_errors, schema_checker
from lightning_ft.task_metrics import score
from lightning_ft.data.formats import DataError

TRIAGE_SCHEMA = {
    "type": "object", "required": ["category", "urgency", "summary"], "additionalProperties": False,
    "properties": {"category": {"enum": ["billing", "shipping", "technical", "account", "other"]},
                   "urgency": {"enum": ["low", "medium", "high"]}, "summary": {"type": "string", "minLength": 1}},
}
REFERENCE = '{"category": "billing", "urgency": "high", "summary": "Refund duplicate charge"}'


def write_items(path, answers: list[str]) -> str:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Ticket {i}"},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for i, a in enumerate(answers)))
    return str(path)


def test_exact_and_contains():
    assert score("  Paris\n", "Paris", "exact") == (True, "")
    assert score("Paris.", "Paris", "exact") == (False, "differs")
    assert score("It is PARIS, of course", "paris", "contains")[0]
    assert not score("Lyon", "Paris", "contains")[0]


def test_regex_without_groups_matches_the_output_and_with_groups_compares_to_the_reference():
    assert score("Answer: 42", "whatever", "regex", re.compile(r"\d+"))[0]
    assert not score("no digits", "whatever", "regex", re.compile(r"\d+"))[0]
    category = re.compile(r'"category": "(\w+)"')
    assert score('{"category": "billing", "urgency": "low"}', REFERENCE, "regex", category)[0]
    assert score('{"category": "shipping"}', REFERENCE, "regex", category) == (False, "groups ('shipping',) differ")


@pytest.mark.parametrize("checker", [schema_checker(TRIAGE_SCHEMA), lambda v: builtin_schema_errors(v, TRIAGE_SCHEMA)],
                         ids=["jsonschema", "builtin"])
def test_json_validity_schema_and_matched_keys(checker):
    keys = ("category", "urgency")
    assert score(REFERENCE, REFERENCE, "json", schema_errors=checker, match_keys=keys) == (True, "")
    assert score("```json\n{}\n```", REFERENCE, "json")[1].startswith("invalid JSON")
    assert not score('{"category": "billing", "urgency": "high"}', REFERENCE, "json", schema_errors=checker)[0]
    assert not score(REFERENCE.replace("billing", "money"), REFERENCE, "json", schema_errors=checker)[0]
    assert not score(REFERENCE[:-1] + ', "extra": 1}', REFERENCE, "json", schema_errors=checker)[0]
    wrong = REFERENCE.replace("high", "low")
    assert score(wrong, REFERENCE, "json", schema_errors=checker, match_keys=keys) == (False, "wrong urgency")
    assert score(wrong, REFERENCE, "json", schema_errors=checker) == (True, "")  # the schema alone allows it


def test_builtin_schema_subset():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1},
                                               "tags": {"type": "array", "items": {"type": "string"}}}}
    assert builtin_schema_errors({"n": 2, "tags": ["a"]}, schema) == []
    assert builtin_schema_errors({"n": True}, schema) == ["$.n is not of type integer"]
    assert builtin_schema_errors({"n": 0, "tags": [1]}, schema) == [
        "$.n is out of range", "$.tags[0] is not of type string"]
    assert builtin_schema_errors([], schema) == ["$ is not of type object"]


def test_builtin_checker_refuses_what_it_cannot_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # as if not installed
    assert schema_checker(TRIAGE_SCHEMA)({"category": "x"})  # the built-in subset works
    with pytest.raises(ValueError, match=r"json_schema uses \['oneOf', 'type=7'\], which the built-in checker "
                                         r"does not support: pip install jsonschema"):
        schema_checker({"type": "object", "properties": {"a": {"oneOf": []}, "b": {"type": 7}}})


def test_arguments_are_checked_together(tmp_path):
    path = write_items(tmp_path / "t.jsonl", ["x"])
    with pytest.raises(ValueError, match=r"(?s)metric='bleu'.*max_new_tokens=0: must be an integer >= 1"
                                         r".*batch_size=-1"):
        TaskEval(path, metric="bleu", max_new_tokens=0, batch_size=-1)
    with pytest.raises(ValueError, match=r"pattern=None: set it exactly when metric='regex'"):
        TaskEval(path, metric="regex")
    with pytest.raises(ValueError, match=r"pattern='\(': not a regular expression"):
        TaskEval(path, metric="regex", pattern="(")
    with pytest.raises(ValueError, match=r"json_schema and match_keys apply only to metric='json'"):
        TaskEval(path, metric="exact", match_keys=["a"])
    with pytest.raises(ValueError, match=r"json_schema='/no/schema.json': cannot read a JSON schema"):
        TaskEval(path, metric="json", json_schema="/no/schema.json")
    with pytest.raises(ValueError, match=r"json_schema is not a valid JSON schema: 7 is not valid"):
        TaskEval(path, metric="json", json_schema={"type": 7})


def test_references_that_can_never_match_are_rejected_with_their_lines(tmp_path):
    path = write_items(tmp_path / "t.jsonl", [REFERENCE, "not json", '{"category": "billing"}'])
    with pytest.raises(ValueError, match=r"(?s)t\.jsonl:2: reference answer fails the json metric itself \(invalid JSON"
                                         r".*t\.jsonl:3: reference answer fails the json metric itself"):
        TaskEval(path, metric="json", json_schema=TRIAGE_SCHEMA)
    with pytest.raises(ValueError, match=r"u\.jsonl:1: reference answer does not match pattern"):
        TaskEval(write_items(tmp_path / "u.jsonl", ["no label"]), metric="regex", pattern=r"label: (\w+)")


def test_bad_data_file_raises_data_error_at_construction(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        TaskEval(str(tmp_path / "missing.jsonl"))


def test_items_prompt_reference_max_items_and_schema_file(tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(TRIAGE_SCHEMA))
    path = write_items(tmp_path / "t.jsonl", [REFERENCE] * 5)
    callback = TaskEval(path, metric="json", json_schema=str(schema_file), match_keys=["category"], max_items=3,
                        system_prompt="Triage.", baseline_system_prompt="Triage carefully.")
    assert len(callback.items) == 3 and callback.items[0].reference == REFERENCE
    assert callback.items[0].messages == ({"role": "system", "content": "Triage."},
                                          {"role": "user", "content": "Ticket 0"})
    assert callback._prompt(callback.items[0], baseline=True)[0] == {"role": "system", "content": "Triage carefully."}
    assert callback._prompt(callback.items[0], baseline=False)[0]["content"] == "Triage."


def test_state_dict_round_trip(tmp_path):
    path = write_items(tmp_path / "t.jsonl", ["a"])
    first = TaskEval(path, name="qa")
    first.baseline, first.history, first._validations = 0.25, [TaskRecord(step=10, success_rate=0.5)], 3
    state = first.state_dict()
    assert state["history"] == [{"step": 10, "success_rate": 0.5}]  # plain types in the checkpoint
    second = TaskEval(path, name="qa")
    second.load_state_dict(state)
    assert (second.baseline, second.history, second._validations) == (0.25, [TaskRecord(10, 0.5)], 3)
    assert second.state_key == "TaskEval{'name': 'qa'}" != TaskEval(path).state_key


def test_a_checkpoint_with_the_old_state_key_still_resumes(tmp_path):
    callback = TaskEval(write_items(tmp_path / "t.jsonl", ["a"]), name="qa")
    state = {"baseline": 0.25, "history": [{"step": 10, "success_rate": 0.5}], "validations": 3}
    checkpoint = {"callbacks": {"TaskEval[qa]": state}}  # written before state keys held the settings
    callback.on_load_checkpoint(None, None, checkpoint)
    assert checkpoint["callbacks"][callback.state_key] is state  # where Lightning's load_state_dict looks next
    other = {"callbacks": {"TaskEval[other]": state}}
    callback.on_load_checkpoint(None, None, other)
    assert callback.state_key not in other["callbacks"]  # another TaskEval's state is not taken
