"""JSON Schema errors as the API's ``422`` ``errors``: the one conversion.

Used for a task's input against its agent's schema (at submission) and for a human's
answer against ``input_request.schema`` (``POST /input``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator, SchemaError, validators
from jsonschema.exceptions import ValidationError


def schema_errors(schema: Any, value: Any, prefix: str = "input") -> dict[str, list[str]]:
    """``{"<prefix>.<path>": [messages]}`` for ``value`` against ``schema``; empty when it
    matches. A schema that is not a valid JSON Schema checks nothing (it is the agent's
    mistake, which must not block the caller)."""
    if not isinstance(schema, Mapping):
        return {}
    schema = dict(schema)
    validator_cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        validator_cls.check_schema(schema)
    except SchemaError:
        return {}
    errors: dict[str, list[str]] = {}
    found = validator_cls(schema).iter_errors(value)
    for error in sorted(found, key=lambda e: list(map(str, e.absolute_path))):
        for path in _paths(error, prefix):
            errors.setdefault(path, []).append(_message(error))
    return errors


def _paths(error: ValidationError, prefix: str) -> list[str]:
    """Dotted paths an error belongs to; an error about an object's keys (required,
    additionalProperties) is reported on the keys themselves."""
    base = ".".join([prefix, *(str(p) for p in error.absolute_path)])
    instance = error.instance
    if error.validator == "required" and isinstance(instance, Mapping):
        for prop in error.validator_value:
            if prop not in instance and error.message.startswith(repr(prop)):
                return [f"{base}.{prop}"]
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        known = set((error.schema.get("properties") or {}).keys())
        extra = [k for k in instance if k not in known]
        if extra:
            return [f"{base}.{k}" for k in extra]
    return [base]


def _message(error: ValidationError) -> str:
    if error.validator == "required":
        return "is required"
    if error.validator == "additionalProperties":
        return "is not a known field"
    if error.validator == "pattern" and str(error.validator_value).lower().startswith("^[hh]"):
        return "must be an absolute http or https URL"
    return error.message
