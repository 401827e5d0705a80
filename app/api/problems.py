"""One handler turns every error into problem+json (RFC 9457)."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from app.errors import PROBLEM_JSON, ApiError, InvalidJson, Unavailable, ValidationFailed
from app.ops.redaction import redact
from app.store.db_errors import is_database_unavailable

log = logging.getLogger(__name__)


def problem_response(error: ApiError) -> Response:
    # An error body never echoes a credential (V2.md 12a), whatever a message quoted.
    body = redact(error.body(), by_name=False)
    response = Response(json.dumps(body), status=error.status, mimetype=PROBLEM_JSON)
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


# HTTP errors raised by Flask/werkzeug itself, mapped to our codes.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def register(app: Flask) -> None:
    """Install the handlers that turn every error into problem+json."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return problem_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        errors = None
        data = getattr(error, "data", None)  # webargs/smorest put validation messages here
        if status == 422 and isinstance(data, dict):
            errors = _flatten(data.get("messages", {}))
        if status == 422 and errors is None:
            errors = {}
        if status == 400 and isinstance(data, dict) and isinstance(data.get("exc"), ValueError):
            # webargs could not parse a JSON body (views with @json_body never get here).
            return problem_response(InvalidJson("The request body is not valid JSON."))
        title = error.name
        if status == 422:
            detail, title = "The request did not validate; see errors.", ValidationFailed.title
        elif status == 413:
            detail = "The request body is larger than OUTLAST_MAX_BODY_BYTES."
        else:
            detail = error.description or error.name
        problem = ApiError(detail, status=status, code=code, title=title, errors=errors)
        response = problem_response(problem)
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        if is_database_unavailable(error):
            return problem_response(
                Unavailable("The database is unreachable; retry shortly.", retry_after=5)
            )
        log.exception("unhandled error")
        return problem_response(
            ApiError(
                "An unexpected error occurred; it has been logged.",
                status=500,
                code="internal_error",
                title="Internal server error",
            )
        )


def _flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """webargs' nested ``{location: {field: [msg]}}`` to ``{"a.b": [msg]}``."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key in ("json", "query", "headers", "form") and not prefix:
                out.update(_flatten(value, ""))
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_schema" and prefix:  # a nested object's own error names the object
                path = prefix
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[path] = value
            else:
                out.update(_flatten(value, path))
    elif isinstance(messages, list):
        out[prefix or "_schema"] = [str(m) for m in messages]
    return out
