"""Errors are values with a stable ``code``; one handler turns them into problem+json.

Raise :class:`ApiError` (or a subclass) anywhere in a request; the handlers registered by
:func:`register` answer with an RFC 9457 body ``{type, title, status, detail, code, …}``
and ``Content-Type: application/problem+json``. Every 422 carries ``errors``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://outlast.dev/problems/"
PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """An error answer: HTTP ``status``, stable ``code``, human ``detail``."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        title: str | None = None,
        errors: Mapping[str, list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.detail = detail
        self.status = status or self.status
        self.code = code or self.code
        self.title = title or self.title
        self.errors = dict(errors) if errors is not None else None
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code.replace("_", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


class ValidationFailed(ApiError):
    status, code, title = 422, "validation_error", "Validation failed"

    def __init__(self, errors: Mapping[str, list[str]], detail: str | None = None, **kw: Any):
        super().__init__(detail or "The request did not validate; see errors.", errors=errors, **kw)


class InvalidJson(ApiError):
    status, code, title = 400, "invalid_json", "Invalid JSON"


class InvalidIdempotencyKey(ApiError):
    status, code, title = 400, "invalid_idempotency_key", "Invalid Idempotency-Key"


class UnsupportedMediaType(ApiError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class PayloadTooLarge(ApiError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class Unauthorized(ApiError):
    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str = "A valid API key is required: Authorization: Bearer <key>."):
        # The bare challenge of API.md; RFC 6750 makes its parameters optional.
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ApiError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ApiError):
    status, code, title = 409, "conflict", "Conflict"


class IdempotencyKeyReused(ApiError):
    status, code, title = 422, "idempotency_key_reused", "Idempotency-Key reused"

    def __init__(self) -> None:
        message = "This Idempotency-Key was already used with a different request body."
        super().__init__(message, errors={"Idempotency-Key": [message]})


class IdempotencyKeyInFlight(ApiError):
    status, code, title = 409, "idempotency_key_in_flight", "Idempotency-Key in flight"

    def __init__(self) -> None:
        super().__init__(
            "A request with this Idempotency-Key is still being processed; retry shortly.",
            headers={"Retry-After": "1"},
        )


class TaskTerminal(ApiError):
    status, code, title = 409, "task_terminal", "Task already finished"


class TaskNotWaiting(ApiError):
    status, code, title = 409, "task_not_waiting", "Task not waiting for input"


class Unavailable(ApiError):
    status, code, title = 503, "unavailable", "Service unavailable"

    def __init__(self, detail: str, retry_after: int = 5):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class RateLimited(ApiError):
    status, code, title = 429, "rate_limited", "Too many requests"


def problem_response(error: ApiError) -> Response:
    response = Response(json.dumps(error.body()), status=error.status, mimetype=PROBLEM_JSON)
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
        from app.db_errors import is_database_unavailable

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
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[path] = value
            else:
                out.update(_flatten(value, path))
    elif isinstance(messages, list):
        out[prefix or "_schema"] = [str(m) for m in messages]
    return out
