"""A JSON Schema checker: ``jsonschema`` when installed, else a small built-in subset of the standard."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_BUILTIN_KEYWORDS = {"type", "enum", "const", "required", "properties", "additionalProperties", "items",
                     "minLength", "maxLength", "minimum", "maximum", "pattern", "$schema", "$id", "title",
                     "description"}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def builtin_schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """A small JSON Schema subset (type, enum, const, required, properties, additionalProperties, items,
    string lengths, numeric bounds, pattern), used when the ``jsonschema`` package is not installed."""
    errors = []
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return [f"{where} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}={json.dumps(value)} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where} is not {json.dumps(schema['const'])}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", float("inf")):
            errors.append(f"{where} has a length outside [{schema.get('minLength', 0)}, {schema.get('maxLength')}]")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where} does not match {schema['pattern']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            errors.append(f"{where} is out of range")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where} misses key {key!r}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += builtin_schema_errors(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where} has unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += builtin_schema_errors(item, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += builtin_schema_errors(item, schema["items"], f"{where}[{index}]")
    return errors


def _unsupported_keywords(schema: Any) -> set[str]:
    """Keywords (and ``type`` values) of a schema that :func:`builtin_schema_errors` cannot check."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema) - _BUILTIN_KEYWORDS
    types = schema.get("type", [])
    found |= {f"type={t!r}" for t in ([types] if not isinstance(types, list) else types)
              if t not in (*_TYPES, "integer", "number")}
    for child in schema.get("properties", {}).values():
        found |= _unsupported_keywords(child)
    for key in ("items", "additionalProperties"):
        found |= _unsupported_keywords(schema.get(key))
    return found


def schema_checker(schema: dict[str, Any]) -> Callable[[Any], list[str]]:
    """``value -> list of errors`` for a JSON schema: ``jsonschema`` when installed, else the built-in subset."""
    try:
        import jsonschema
    except ImportError:
        unsupported = _unsupported_keywords(schema)
        if unsupported:
            raise ValueError(f"json_schema uses {sorted(unsupported)}, which the built-in checker does not support: "
                             "pip install jsonschema") from None
        return lambda value: builtin_schema_errors(value, schema)
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ValueError(f"json_schema is not a valid JSON schema: {error.message}") from None
    validator = validator_class(schema)
    return lambda value: [error.message for error in validator.iter_errors(value)]
