"""Errors are values with a stable ``code`` (API.md's list); nothing here knows HTTP
frameworks.

Raise :class:`ApiError` (or a subclass) anywhere in a request; :mod:`app.api.problems`
answers with an RFC 9457 body ``{type, title, status, detail, code, …}`` and
``Content-Type: application/problem+json``. Every 422 carries ``errors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


class TaskNotTerminal(ApiError):
    status, code, title = 409, "task_not_terminal", "Task not finished"


class Unavailable(ApiError):
    status, code, title = 503, "unavailable", "Service unavailable"

    def __init__(self, detail: str, retry_after: int = 5):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class RateLimited(ApiError):
    status, code, title = 429, "rate_limited", "Too many requests"
