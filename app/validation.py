"""JSON Schema errors as the API's ``422`` ``errors``: the one conversion.

Used for a task's input against its agent's schema (at submission) and for a human's
answer against ``input_request.schema`` (``POST /input``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator, SchemaError, validators
from jsonschema.exceptions import ValidationError

# Validators of the schemas seen, by canonical JSON (a few: one per agent version and
# per input request shape); emptied when it would pass this many.
_VALIDATORS_MAX = 256
_validators: dict[str, Any] = {}


def _validator(schema: Mapping[str, Any]) -> Any:
    """The validator of ``schema``, or ``None`` when it is not a valid JSON Schema.

    Checking a schema against its metaschema cost a fifth of a submission's time when
    it was done for every request; a JSON schema is known by its JSON, so the check and
    the validator are made once per schema text."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):  # not JSON: nothing to key it by, check it each time
        return _checked_validator(dict(schema))
    if key not in _validators:
        if len(_validators) >= _VALIDATORS_MAX:
            _validators.clear()
        _validators[key] = _checked_validator(dict(schema))
    return _validators[key]


def _checked_validator(schema: dict[str, Any]) -> Any:
    validator_cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        validator_cls.check_schema(schema)
    except SchemaError:
        return None
    return validator_cls(schema)


def schema_errors(schema: Any, value: Any, prefix: str = "input") -> dict[str, list[str]]:
    """``{"<prefix>.<path>": [messages]}`` for ``value`` against ``schema``; empty when it
    matches. A schema that is not a valid JSON Schema checks nothing (it is the agent's
    mistake, which must not block the caller)."""
    if not isinstance(schema, Mapping):
        return {}
    validator = _validator(schema)
    if validator is None:
        return {}
    errors: dict[str, list[str]] = {}
    found = validator.iter_errors(value)
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
