"""JSON request bodies: the content-type, size and syntax checks that come before
schema validation, so that each failure gets its own status and ``code``.

``@json_body`` goes above flask-smorest's ``@blp.arguments`` (it must run first):
``413`` larger than ``OUTLAST_MAX_BODY_BYTES``, ``415`` not JSON, ``400 invalid_json``
for anything :func:`parse_json` refuses; the parsed body is left in ``g.json_body``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

from flask import current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from app.errors import InvalidJson, PayloadTooLarge, UnsupportedMediaType, ValidationFailed


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no number too large for a double.

    PostgreSQL's ``jsonb`` would refuse those later; refusing them here makes them a
    ``400`` instead of a failed insert.
    """
    text = raw.decode("utf-8")
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


# Deeper documents are refused before any recursive code (schema validation,
# serialization) walks them and runs out of stack.
MAX_DEPTH = 64


def unstorable_strings(value: Any, path: str = "") -> dict[str, list[str]]:
    """Problems ``jsonb`` or the validators would have with ``value``: strings with NUL
    characters or lone surrogates, and nesting deeper than :data:`MAX_DEPTH`."""
    problems: dict[str, list[str]] = {}

    def bad(text: str) -> str | None:
        if "\x00" in text:
            return "Must not contain the NUL character (\\u0000)."
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "Must not contain unpaired UTF-16 surrogates."
        return None

    # Iterative, so that the walk itself cannot exhaust the stack.
    pending: list[tuple[Any, str, int]] = [(value, path, 0)]
    while pending:
        item, where, depth = pending.pop()
        if depth > MAX_DEPTH:
            problems.setdefault(where or "_schema", []).append(
                f"Must not be nested more than {MAX_DEPTH} levels deep."
            )
            continue
        if isinstance(item, str):
            message = bad(item)
            if message:
                problems.setdefault(where or "_schema", []).append(message)
        elif isinstance(item, dict):
            for key, child in item.items():
                message = bad(key)
                if message:
                    problems.setdefault(where or "_schema", []).append(f"Key: {message}")
                    continue
                pending.append((child, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                pending.append((child, f"{where}.{index}" if where else str(index), depth + 1))
    return problems


def read_json_body() -> Any:
    """Check and parse the request body; raises the ApiError that fits."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge("The request body is larger than OUTLAST_MAX_BODY_BYTES.")
    if not request.is_json:
        raise UnsupportedMediaType(
            "The request body must be JSON, sent with Content-Type: application/json."
        )
    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:  # a chunked body that turned out too long
        raise PayloadTooLarge("The request body is larger than OUTLAST_MAX_BODY_BYTES.") from None
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidJson(f"The request body is not valid JSON: {exc}.") from None
    problems = unstorable_strings(body)
    if problems:
        raise ValidationFailed(problems)
    return body


def has_body() -> bool:
    """The request came with a body (a length above 0, or chunked)."""
    if request.content_length is not None:
        return request.content_length > 0
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def check_any_body() -> None:
    """Every /v1 request that sends a body, whatever its endpoint, goes through
    :func:`read_json_body` before any other code parses it (a before_request hook):
    no endpoint's own parser (webargs, ``json.loads``) ever sees a body that is too
    large, not JSON, or deep enough to exhaust the stack. A body of only whitespace
    counts as none."""
    if request.method not in ("POST", "PUT", "PATCH", "DELETE") or not has_body():
        return
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge("The request body is larger than OUTLAST_MAX_BODY_BYTES.")
    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise PayloadTooLarge("The request body is larger than OUTLAST_MAX_BODY_BYTES.") from None
    if raw.strip():
        g.json_body = read_json_body()


def json_body(view: Callable[..., Any]) -> Callable[..., Any]:
    """Run :func:`read_json_body` before ``view`` (and before its argument parsing): the
    body is required. Reuses what :func:`check_any_body` already parsed."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "json_body" not in g:
            g.json_body = read_json_body()
        return view(*args, **kwargs)

    return wrapper
