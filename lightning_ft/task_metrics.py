"""Whether a generated answer solves the task: exact, contains, regex or JSON (with a schema and key checks)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Literal

Metric = Literal["exact", "regex", "json", "contains"]


def score(output: str, reference: str, metric: Metric, pattern: re.Pattern | None = None,
          schema_errors: Callable[[Any], list[str]] | None = None, match_keys: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether a generation succeeds, and why not.

    Args:
        output: The generated answer.
        reference: The held-out answer.
        metric: ``exact``: equal after stripping whitespace. ``contains``: the reference appears in the output
            (case-insensitive). ``regex``: ``pattern`` matches the output (``re.search``); when it has groups,
            they must equal the reference's groups. ``json``: the output is one JSON value, passes
            ``schema_errors`` if given, and agrees with the reference on ``match_keys``.
        pattern: Compiled regular expression for ``regex``.
        schema_errors: ``value -> list of errors`` (see :func:`lightning_ft.json_schema.schema_checker`).
        match_keys: For ``json``: keys whose values must equal the reference's.
    """
    output = output.strip()
    if metric == "exact":
        return output == reference.strip(), "" if output == reference.strip() else "differs"
    if metric == "contains":
        found = reference.strip().casefold() in output.casefold()
        return found, "" if found else "reference not found"
    if metric == "regex":
        match = pattern.search(output)
        if match is None:
            return False, "no match"
        if pattern.groups and match.groups() != pattern.search(reference).groups():
            return False, f"groups {match.groups()} differ"
        return True, ""
    try:
        value = json.loads(output)
    except json.JSONDecodeError as error:
        return False, f"invalid JSON: {error.msg}"
    errors = schema_errors(value) if schema_errors is not None else []
    if errors:
        return False, errors[0]
    expected = json.loads(reference)
    wrong = [key for key in match_keys if not isinstance(value, dict) or value.get(key) != expected[key]]
    return (False, f"wrong {', '.join(wrong)}") if wrong else (True, "")
