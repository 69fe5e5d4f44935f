"""Read chat data files into typed conversations, reporting every bad record with file, line and field.

Four record formats are understood, detected per file from the first record whose keys match one
(or forced with ``format=``)::

    messages           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}
    alpaca             {"instruction": "...", "input": "...", "output": "...", "system": "..."}
    sharegpt           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}
    prompt_completion  {"prompt": "..." | [messages], "completion": "..." | [messages]}

An assistant message (``messages``, ``sharegpt`` and message lists) may carry ``"train": false`` or
``"weight": 0`` to keep it out of the loss (e.g. a bad early turn), kept on the message as ``train``.

``.jsonl`` files hold one record per line (blank lines skipped); ``.json`` files hold one JSON list.
:func:`scan_file` never raises on bad data: it returns the good conversations and a list of
:class:`DataProblem`. :func:`read_conversations` raises one :class:`DataError` listing them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict


class Message(TypedDict):
    """One chat turn; ``train`` is present (false) only on an assistant turn opted out of the loss."""

    role: str
    content: str
    train: NotRequired[bool]


ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")
FormatName = Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion"]
#: Fields a record must have for each format, in detection order.
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
#: ShareGPT speaker names and the role each one means.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
_MAX_LISTED = 50


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a data file, located as precisely as the problem allows.

    Attributes:
        path: The file as the user named it.
        line: 1-based line (JSONL), 1-based record (JSON list) or 0-based row index (Parquet, CSV, Arrow, saved
            and Hub datasets, as in ``dataset[row]``); ``None`` for a whole-file problem.
        field: The field path inside the record, e.g. ``messages[2].role``; ``None`` for the record.
        message: What is wrong and, where it helps, what is allowed.
        unit: ``"line"``, ``"record"`` or ``"row"``: what ``line`` counts.
    """

    path: str
    line: int | None
    field: str | None
    message: str
    unit: Literal["line", "record", "row"] = "line"

    @property
    def location(self) -> str:
        """``path:line`` for JSONL, ``path:record N`` for a JSON list, ``path:row N`` for a table, else the path."""
        return format_location(self.path, self.line, self.unit)

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        return f"{self.location}:{field} {self.message}"


def format_location(path: str, line: int | None, unit: str) -> str:
    if line is None:
        return path
    return f"{path}:{line}" if unit == "line" else f"{path}:{unit} {line}"


class DataError(ValueError):
    """Bad training data; the message lists every problem (the first fifty) with file, line and field."""

    def __init__(self, problems: Sequence[DataProblem | str]) -> None:
        self.problems = list(problems)
        lines = [str(problem) for problem in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"... and {len(self.problems) - _MAX_LISTED} more")
        count = len(self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the data:\n  " + "\n  ".join(lines))


@dataclass(frozen=True)
class Conversation:
    """A checked conversation and where it came from (``source`` is ``file:line`` or ``file:record N``)."""

    messages: tuple[Message, ...]
    source: str


def _conversation_issues(messages: Sequence[Mapping[str, Any]]) -> list[tuple[int | None, str | None, str]]:
    """All rule violations as ``(message index or None, "role"/"content"/None, text)``."""
    issues: list[tuple[int | None, str | None, str]] = []
    if not messages:
        return [(None, None, "conversation is empty")]
    expected, ordered = "user", True
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            issues.append((index, "role", f"unknown role {role!r} (allowed: {', '.join(ROLES)})"))
        if not isinstance(content, str):
            issues.append((index, "content", f"content must be a string, got {type_name(content)}"))
        elif not content.strip():
            issues.append((index, "content", f"empty {role} message" if role in ROLES else "empty message"))
        if role == "system":
            if index != 0:
                issues.append((index, "role", "a system message may only come first"))
        elif role in ROLES and ordered:
            if role != expected:
                # Report only the first break: after a missing turn every later one would be "wrong" too.
                article = "an" if expected == "assistant" else "a"
                issues.append((index, "role", f"expected {article} {expected} message here (after an optional system "
                                              f"message, turns alternate user, assistant), got {role!r}"))
                ordered = False
            expected = "assistant" if role == "user" else "user"
    roles = [message.get("role") for message in messages]
    if "assistant" not in roles:
        issues.append((None, None, "no assistant message: nothing to train on"))
    elif roles[-1] != "assistant":
        issues.append((len(roles) - 1, "role", f"the last message must be from the assistant, got {roles[-1]!r}"))
    return issues


def check_conversation(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Check the ordering and content rules; return one readable line per problem (empty when fine).

    Rules: an optional system message, only first; then user and assistant strictly alternating,
    starting with user; at least one assistant message, and the last message is the assistant's;
    every content a non-blank string; roles among :data:`ROLES`.

    Args:
        messages: The conversation, as dicts with ``role`` and ``content``.

    Example:
        >>> check_conversation([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}])
        ["messages[1].role: unknown role 'bot' (allowed: system, user, assistant)"]
    """
    return [
        f"messages[{index}].{key}: {text}" if index is not None else text
        for index, key, text in _conversation_issues(messages)
    ]


def type_name(value: Any) -> str:
    """What a JSON value is, in the words of an error message ("an object", "a list", "null", ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# An extractor turns a record into messages, the field path of each message's role and content, and
# structural problems as (field, text).
_Fields = list[tuple[str, str]]
_Extracted = tuple[list[dict[str, Any]], _Fields, list[tuple[str, str]]]


def _message_list(value: Any, name: str, role_key: str = "role", content_key: str = "content",
                  speakers: Mapping[str, str] | None = None) -> _Extracted:
    if not isinstance(value, list):
        return [], [], [(name, f"must be a list of messages, got {type_name(value)}")]
    messages, fields, problems = [], [], []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            problems.append((where, f"must be an object with {role_key!r} and {content_key!r}, "
                                    f"got {type_name(item)}"))
            continue
        missing = [key for key in (role_key, content_key) if key not in item]
        if missing:
            problems.append((where, f"missing field {missing[0]!r} (has: {', '.join(item) or 'nothing'})"))
            continue
        role = item[role_key]
        if speakers is not None:
            role = speakers.get(role.lower()) if isinstance(role, str) else None
            if role is None:
                problems.append((f"{where}.{role_key}", f"unknown speaker {item[role_key]!r} "
                                                        f"(allowed: {', '.join(speakers)})"))
                continue
        message = {"role": role, "content": item[content_key]}
        opt_out = _opt_out(item, role, where)
        if isinstance(opt_out, tuple):
            problems.append(opt_out)
            continue
        if opt_out:
            message["train"] = False
        messages.append(message)
        fields.append((f"{where}.{role_key}", f"{where}.{content_key}"))
    return messages, fields, problems


def _opt_out(item: Mapping[str, Any], role: Any, where: str) -> bool | tuple[str, str]:
    """Whether a message opts out of training (``"train": false`` or ``"weight": 0``), or the problem with it."""
    if "train" not in item and "weight" not in item:
        return False
    train, weight = item.get("train", True), item.get("weight", 1)
    if not isinstance(train, bool):
        return f"{where}.train", f"must be true or false, got {type_name(train)}"
    if isinstance(weight, bool) or weight not in (0, 1):
        return f"{where}.weight", f"must be 0 (not trained) or 1, got {weight!r}"
    if role != "assistant" and (not train or weight == 0):
        return where, "only an assistant message can opt out of training (train: false / weight: 0)"
    return not train or weight == 0


def _from_messages(record: dict[str, Any]) -> _Extracted:
    return _message_list(record["messages"], "messages")


def _from_sharegpt(record: dict[str, Any]) -> _Extracted:
    return _message_list(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)


def _from_alpaca(record: dict[str, Any]) -> _Extracted:
    messages, fields, problems = [], [], []
    for key in ("input", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            problems.append((key, f"must be a string, got {type_name(record[key])}"))
    if problems:
        return [], [], problems
    # Alpaca exports often carry "system": "" for "no system prompt"; treat blank as absent.
    if (record.get("system") or "").strip():
        messages.append({"role": "system", "content": record["system"]})
        fields.append(("system", "system"))
    prompt, extra = record["instruction"], record.get("input") or ""
    if isinstance(prompt, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    fields += [("instruction", "instruction"), ("output", "output")]
    return messages, fields, problems


def _from_prompt_completion(record: dict[str, Any]) -> _Extracted:
    messages, fields, problems = [], [], []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = record[key]
        if isinstance(value, str):
            messages.append({"role": role, "content": value})
            fields.append((key, key))
        elif isinstance(value, list):
            part = _message_list(value, key)
            messages += part[0]
            fields += part[1]
            problems += part[2]
        else:
            problems.append((key, f"must be a string or a list of messages, got {type_name(value)}"))
    return messages, fields, problems


_EXTRACTORS: dict[str, Callable[[dict[str, Any]], _Extracted]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The first format whose required fields the record has, or ``None``."""
    for name, required in REQUIRED_FIELDS.items():
        if all(key in record for key in required):
            return name
    return None


# Parsed file: (line or record number, value) pairs, what the numbers count, and problems found so far.
_Loaded = tuple[list[tuple[int, Any]], Literal["line", "record"], list[DataProblem]]


def load_records(path: str) -> _Loaded:
    """Parse a file into numbered records; a file-level problem comes back with no records."""
    file = Path(path).expanduser()

    def whole(message: str) -> _Loaded:
        return [], "line", [DataProblem(path, None, None, message)]

    if file.is_dir():
        return whole("is a directory, expected a .jsonl or .json file")
    if not file.is_file():
        return whole("file not found")
    if file.suffix not in (".jsonl", ".json"):
        return whole(f"unsupported file type {file.suffix!r} (allowed: .jsonl with one record per line, "
                     ".json with a list of records)")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return whole(f"is not UTF-8 text (undecodable byte at offset {error.start}); save it as UTF-8")
    except OSError as error:
        return whole(f"cannot be read: {error.strerror or error}")
    if file.suffix == ".json":
        return _parse_json_list(path, text)
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append(DataProblem(path, number, None, f"invalid JSON: {error.msg} (column {error.colno})"))
        except RecursionError:
            problems.append(DataProblem(path, number, None, "invalid record: JSON nested too deeply"))
    return records, "line", problems


def _parse_json_list(path: str, text: str) -> _Loaded:
    if not text.strip():
        return [], "record", []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (one record per line belongs in a .jsonl file)" if error.msg == "Extra data" else ""
        return [], "line", [DataProblem(path, error.lineno, None,
                                        f"invalid JSON: {error.msg} (column {error.colno}){hint}")]
    except RecursionError:
        return [], "record", [DataProblem(path, None, None, "invalid JSON: nested too deeply")]
    if not isinstance(value, list):
        return [], "record", [DataProblem(path, None, None, f"a .json file must hold a list of records, "
                                                            f"got {type_name(value)}")]
    return list(enumerate(value, start=1)), "record", []


def _resolve_format(path: str, records: list[tuple[int, Any]], format: str) -> tuple[str | None, list[DataProblem]]:
    if format != "auto":
        return format, []
    for _, record in records:
        if isinstance(record, dict) and (found := detect_format(record)) is not None:
            return found, []
    first = next((record for _, record in records if isinstance(record, dict)), None)
    keys = ", ".join(first) if first else "none"
    needs = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in REQUIRED_FIELDS.items())
    return None, [DataProblem(path, None, None, f"cannot detect the record format: no record has the fields "
                                                f"of one (first record's fields: {keys}; formats need {needs})")]


def convert_record(record: Any, format: str,
             system_prompt: str | None) -> tuple[list[dict[str, Any]], list[tuple[str | None, str]]]:
    """Turn one parsed record into messages, or problems as ``(field, text)``."""
    if not isinstance(record, dict):
        return [], [(None, f"expected a JSON object, got {type_name(record)}")]
    missing = [key for key in REQUIRED_FIELDS[format] if key not in record]
    if missing:
        has = ", ".join(record) or "nothing"
        return [], [(key, f"missing field {key!r} ({format} format; record has: {has})") for key in missing]
    messages, fields, problems = _EXTRACTORS[format](record)
    if problems:
        return [], list(problems)
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
        fields.insert(0, ("system_prompt", "system_prompt"))
    container = REQUIRED_FIELDS[format][0] if format in ("messages", "sharegpt") else None
    issues = []
    for index, key, text in _conversation_issues(messages):
        if index is None:
            issues.append((container, text))
        else:
            issues.append((fields[index][0 if key == "role" else 1], text))
    return ([], issues) if issues else (messages, [])


def scan_file(path: str | Path, format: FormatName = "auto",
              system_prompt: str | None = None) -> tuple[list[Conversation], list[DataProblem]]:
    """Read a ``.jsonl`` or ``.json`` chat data file; never raises on bad data.

    Args:
        path: The file. A missing file, a directory or non-UTF-8 bytes become a single problem.
        format: One of ``"messages"``, ``"alpaca"``, ``"sharegpt"``, ``"prompt_completion"``, or
            ``"auto"`` to detect it from the first record whose fields match a format.
        system_prompt: Inserted as the first message of every conversation that has no system message.

    Returns:
        The valid conversations in file order, and one :class:`DataProblem` per bad record (a record
        can have several) or per file-level problem.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of: auto, {', '.join(FORMATS)}")
    path = str(path)
    records, unit, problems = load_records(path)
    if not records:  # nothing parsed: an empty file, or every line is broken JSON (already reported)
        return [], problems or [DataProblem(path, None, None, "no records (the file is empty)")]
    resolved, detect_problems = _resolve_format(path, records, format)
    if resolved is None:
        return [], problems + detect_problems
    conversations = []
    for number, record in records:
        messages, issues = convert_record(record, resolved, system_prompt)
        problems += [DataProblem(path, number, field, text, unit) for field, text in issues]
        if messages:
            typed = tuple(Message(**message) for message in messages)  # type: ignore[typeddict-item]
            conversations.append(Conversation(typed, format_location(path, number, unit)))
    problems.sort(key=lambda problem: problem.line or 0)
    return conversations, problems


def read_conversations(path: str | Path, format: FormatName = "auto",
                       system_prompt: str | None = None) -> list[Conversation]:
    """Like :func:`scan_file`, but raise one :class:`DataError` listing every problem if there are any."""
    conversations, problems = scan_file(path, format, system_prompt)
    if problems:
        raise DataError(problems)
    return conversations
