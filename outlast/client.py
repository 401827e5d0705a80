"""The Python client for Outlast's HTTP API (spec/API.md).

    from outlast.client import Client

    client = Client("https://outlast.example.com", api_key)
    task = client.submit("echo", {"message": "hi", "steps": 3})
    task = client.wait(task["id"], timeout=600)       # long poll, backoff, Retry-After
    for event in client.events(task["id"]):           # the replayable event log
        print(event["seq"], event["type"])
    client.ack(task["id"])                            # got it: purged after the retention

    task = client.submit("echo", {"message": "quick"}, wait=10)  # finished if done in 10 s

- :meth:`Client.submit` sends an ``Idempotency-Key`` (generated unless given) and retries
  connection errors, ``5xx``, ``409`` and ``429`` with the *same* key, so a lost ``202``
  never creates a second task.
- Reads, ``cancel``, ``ack`` and ``delete`` are retried on connection errors and
  ``502``/``503``/``504``; ``send_input`` is never retried blindly (a lost answer is
  checked with :meth:`get`).
- Every call is retried on ``429`` (a rate limit, or the tenant's cap on waiting
  requests: the server did nothing), never sooner than its ``Retry-After``.
- :meth:`Client.events` with ``follow=True`` reconnects by itself when the server ends
  a stream (``OUTLAST_SSE_MAX_SECONDS``), resuming with ``Last-Event-ID``.
- Every problem+json answer raises the :class:`APIError` subclass named after its
  ``code`` (:class:`NotFound`, :class:`TaskTerminal`, :class:`ValidationError`, …).
- :func:`verify_webhook` checks a webhook's Standard Webhooks signature and returns the
  event.

Tasks and events are returned as the JSON objects the API documents (``dict``).
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import requests

from outlast.backoff import Backoff
from outlast.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "Client",
    "OutlastError",
    "NetworkError",
    "WaitTimeout",
    "APIError",
    "BadRequest",
    "InvalidJSON",
    "InvalidIdempotencyKey",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "IdempotencyKeyInFlight",
    "TaskTerminal",
    "TaskNotWaiting",
    "TaskNotTerminal",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "ValidationError",
    "IdempotencyKeyReused",
    "RateLimited",
    "Unavailable",
    "ServerError",
    "WebhookVerificationError",
    "verify_webhook",
    "TERMINAL_STATUSES",
]

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
TERMINAL_EVENT_TYPES = frozenset({"task.completed", "task.failed", "task.cancelled"})
# wait() returns at these: nothing more happens to the task without the caller.
SETTLED_STATUSES = TERMINAL_STATUSES | {"input_required"}

LONG_POLL_MAX_SECONDS = 30
# Prefer: wait=N on submit (V2.md section 3).
SUBMIT_WAIT_MIN_SECONDS = 1
SUBMIT_WAIT_MAX_SECONDS = 60
BACKOFF_MIN_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# Retries of one request: 0.5 s, 1 s, 2 s … with jitter, at most 30 s.
REQUEST_RETRY = Backoff(base=0.5, cap=BACKOFF_MAX_SECONDS, jitter=True)
# Pauses between reads while waiting or following: 1 s, 2 s, 4 s … at most 30 s.
POLL_BACKOFF = Backoff(base=BACKOFF_MIN_SECONDS, cap=BACKOFF_MAX_SECONDS)
USER_AGENT = "outlast-python/0.1"


# --- errors -----------------------------------------------------------------------------------


class OutlastError(Exception):
    """Base class of every error this client raises."""


class NetworkError(OutlastError):
    """The server could not be reached, or the connection broke before an answer came."""


class WaitTimeout(OutlastError, TimeoutError):
    """:meth:`Client.wait` ran out of time; ``task`` is the last representation seen."""

    def __init__(self, task_id: str, timeout: float, task: Mapping[str, Any] | None):
        status = task["status"] if task else "unknown"
        super().__init__(f"task {task_id} still {status} after {timeout:g}s")
        self.task_id = task_id
        self.task = dict(task) if task else None


class APIError(OutlastError):
    """An error answer (problem+json). ``code`` is the stable machine-readable code."""

    def __init__(self, status: int, problem: Mapping[str, Any], headers: Mapping[str, str]):
        self.status = status
        self.problem = dict(problem)
        self.code: str = problem.get("code") or f"http_{status}"
        self.title: str = problem.get("title") or ""
        self.detail: str = problem.get("detail") or ""
        self.errors: dict[str, list[str]] | None = problem.get("errors")
        self.headers = dict(headers)
        self.request_id: str | None = headers.get("X-Request-Id")
        self.retry_after: float | None = _retry_after(headers)
        message = f"{status} {self.code}: {self.detail or self.title}"
        if self.errors:
            message += f" {json.dumps(self.errors, sort_keys=True)}"
        super().__init__(message)


class BadRequest(APIError):
    """400."""


class InvalidJSON(BadRequest):
    """400 ``invalid_json``."""


class InvalidIdempotencyKey(BadRequest):
    """400 ``invalid_idempotency_key``."""


class Unauthorized(APIError):
    """401 ``unauthorized``: the API key is missing, unknown, revoked or expired."""


class NotFound(APIError):
    """404 ``not_found`` (also another tenant's task)."""


class Conflict(APIError):
    """409."""


class IdempotencyKeyInFlight(Conflict):
    """409 ``idempotency_key_in_flight``: the first request with this key is not yet
    committed (:meth:`Client.submit` retries it)."""


class TaskTerminal(Conflict):
    """409 ``task_terminal``: the task is completed or failed."""


class TaskNotWaiting(Conflict):
    """409 ``task_not_waiting``: the task is not in ``input_required``."""


class TaskNotTerminal(Conflict):
    """409 ``task_not_terminal``: acknowledging or deleting a task that has not finished."""


class PayloadTooLarge(APIError):
    """413 ``payload_too_large``."""


class UnsupportedMediaType(APIError):
    """415 ``unsupported_media_type``."""


class ValidationError(APIError):
    """422 ``validation_error``; ``errors`` maps fields (dotted paths) to messages."""


class IdempotencyKeyReused(ValidationError):
    """422 ``idempotency_key_reused``: the same key came with a different body."""


class RateLimited(APIError):
    """429 ``rate_limited``; see ``retry_after``."""


class Unavailable(APIError):
    """503 ``unavailable`` (the database is unreachable); see ``retry_after``."""


class ServerError(APIError):
    """Any other 5xx."""


CODE_ERRORS: dict[str, type[APIError]] = {
    "invalid_json": InvalidJSON,
    "invalid_idempotency_key": InvalidIdempotencyKey,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "idempotency_key_in_flight": IdempotencyKeyInFlight,
    "task_terminal": TaskTerminal,
    "task_not_waiting": TaskNotWaiting,
    "task_not_terminal": TaskNotTerminal,
    "payload_too_large": PayloadTooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "validation_error": ValidationError,
    "idempotency_key_reused": IdempotencyKeyReused,
    "rate_limited": RateLimited,
    "unavailable": Unavailable,
}
STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
}


def error_for(response: requests.Response) -> APIError:
    """The typed exception for an error ``response``."""
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": response.reason or "", "detail": response.text[:500]}
    cls = CODE_ERRORS.get(problem.get("code") or "") or STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else APIError
    return cls(response.status_code, problem, response.headers)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: rare from this API; treat as "a little while"
        return None


# --- the client ---------------------------------------------------------------------------------


class Client:
    """A client of one Outlast deployment, authenticated with one tenant's API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        session: requests.Session | None = None,
    ):
        if not base_url:
            raise ValueError("base_url is required (e.g. http://127.0.0.1:8000)")
        if not api_key:
            raise ValueError("api_key is required")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self._session = session or requests.Session()
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tasks ---

    def submit(
        self,
        agent: str,
        input: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        timeout_seconds: int | None = None,
        idempotency_key: str | None = None,
        budget: Mapping[str, Any] | None = None,
        wait: int | None = None,
    ) -> dict[str, Any]:
        """Submit a task; returns it (status ``pending``, or its current state when the
        key was already used with the same body).

        ``budget`` limits what the task may spend (``max_model_calls``,
        ``max_tool_calls``, ``max_total_tokens``, ``max_steps``, ``on_exhausted``:
        ``"fail"`` or ``"ask"``); the task's ``usage`` says what it spent.

        With ``wait`` (1 to 60 seconds) the answer waits for the task: it is returned
        finished (or in ``input_required``) when that happens within ``wait`` seconds,
        as it is then otherwise. The server's ``Prefer: wait`` does the waiting; against
        a server that ignores it, the client long-polls for the rest of ``wait``.

        The request carries ``idempotency_key`` (a new random one unless given) and is
        retried with that same key on connection errors, ``5xx``, ``409`` (the first
        request with the key still in flight) and ``429``: however many attempts it
        takes, at most one task is created.
        """
        if wait is not None and not SUBMIT_WAIT_MIN_SECONDS <= wait <= SUBMIT_WAIT_MAX_SECONDS:
            raise ValueError(
                f"wait must be {SUBMIT_WAIT_MIN_SECONDS} to {SUBMIT_WAIT_MAX_SECONDS} seconds"
            )
        started = time.monotonic()
        body: dict[str, Any] = {"agent": agent, "input": dict(input or {})}
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        if budget is not None:
            body["budget"] = dict(budget)
        headers = {"Idempotency-Key": idempotency_key or f"idem_{uuid.uuid4().hex}"}
        if wait is not None:
            headers["Prefer"] = f"wait={int(wait)}"
        response = self._send(
            "POST",
            "/v1/tasks",
            json_body=body,
            headers=headers,
            timeout=self.timeout + (wait or 0),
            retry_statuses=frozenset({409, 429, 500, 502, 503, 504}),
            retry_network=True,
        )
        task = response.json()
        applied = "wait" in response.headers.get("Preference-Applied", "")
        if wait is None or applied or task["status"] in SETTLED_STATUSES:
            return task
        remaining = wait - (time.monotonic() - started)
        if remaining < 1:
            return task
        try:
            return self.wait(task["id"], timeout=remaining)
        except WaitTimeout as exc:
            return exc.task or task

    def get(self, task_id: str, *, wait: float | None = None) -> dict[str, Any]:
        """The task. ``wait`` (0–30 s) long-polls: the answer comes when its status or
        step changes, or after ``wait`` seconds."""
        task, _ = self._get_task(task_id, wait)
        assert task is not None  # no If-None-Match was sent: never a 304
        return task

    def list(
        self,
        *,
        status: str | None = None,
        agent: str | None = None,
        acknowledged: bool | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of tasks, newest first: ``{"data": [...], "next_cursor": ...}``.
        ``acknowledged=False``: finished tasks whose result is not yet acknowledged."""
        params = {
            "status": status,
            "agent": agent,
            "acknowledged": None if acknowledged is None else str(bool(acknowledged)).lower(),
            "limit": limit,
            "cursor": cursor,
        }
        return self._request("GET", "/v1/tasks", params=params)

    def iter_tasks(
        self,
        *,
        status: str | None = None,
        agent: str | None = None,
        acknowledged: bool | None = None,
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Every task (newest first), fetching pages as needed."""
        cursor = None
        while True:
            page = self.list(
                status=status,
                agent=agent,
                acknowledged=acknowledged,
                limit=page_size,
                cursor=cursor,
            )
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def children(
        self, task_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the task's child tasks, in the order they were spawned:
        ``{"data": [...], "next_cursor": ...}``."""
        params = {"limit": limit, "cursor": cursor}
        return self._request("GET", f"/v1/tasks/{task_id}/children", params=params)

    def iter_children(self, task_id: str, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every child task of ``task_id`` (spawn order), fetching pages as needed."""
        cursor = None
        while True:
            page = self.children(task_id, limit=page_size, cursor=cursor)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task (again: fine). Raises :class:`TaskTerminal` if it completed or failed.
        A task with completed calls to undo comes back ``compensating`` (V2.md 5), then
        becomes ``cancelled``: :meth:`wait` for it."""
        return self._request("POST", f"/v1/tasks/{task_id}/cancel", retry_network=True)

    def ack(self, task_id: str) -> dict[str, Any]:
        """Acknowledge a finished task's result; returns the task with ``acknowledged_at``
        (the first acknowledgement's time, however often this is called). The server
        purges it ``OUTLAST_TASK_RETENTION_DAYS`` later. Raises :class:`TaskNotTerminal`
        while the task runs."""
        return self._request(
            "POST",
            f"/v1/tasks/{task_id}/ack",
            retry_statuses=frozenset({502, 503, 504}),
            retry_network=True,
        )

    def delete(self, task_id: str) -> None:
        """Delete a finished task now, with everything recorded about it. Raises
        :class:`TaskNotTerminal` while it runs, :class:`NotFound` for an unknown task
        (unless a retry of this very call finds it already gone)."""
        self._send(
            "DELETE",
            f"/v1/tasks/{task_id}",
            timeout=self.timeout,
            retry_statuses=frozenset({502, 503, 504}),
            retry_network=True,
            done_on_retry=frozenset({404}),
        )

    def send_input(self, task_id: str, input: Any) -> dict[str, Any]:
        """Answer a task waiting in ``input_required``; it resumes. Raises
        :class:`TaskNotWaiting` otherwise, :class:`ValidationError` if ``input`` does
        not match the task's ``input_request.schema``."""
        return self._request("POST", f"/v1/tasks/{task_id}/input", json_body={"input": input})

    def steps(self, task_id: str) -> list[dict[str, Any]]:
        """The task's checkpoint log, oldest first."""
        return self._request("GET", f"/v1/tasks/{task_id}/steps")["data"]

    def usage(
        self, *, from_: str | None = None, to: str | None = None, agent: str | None = None
    ) -> dict[str, Any]:
        """What the tenant's tasks spent between the UTC days ``from_`` and ``to``
        (``YYYY-MM-DD``, both included): ``{"totals", "data": [by day and agent]}``."""
        params = {"from": from_, "to": to, "agent": agent}
        return self._request("GET", "/v1/usage", params=params)

    def deliveries(self, task_id: str) -> list[dict[str, Any]]:
        """The task's webhook deliveries."""
        return self._request("GET", f"/v1/tasks/{task_id}/deliveries")["data"]

    def replay_deliveries(self, task_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """Queue a fresh delivery of the task's webhook events (after ``after``)."""
        body = {} if after is None else {"after": after}
        return self._request("POST", f"/v1/tasks/{task_id}/deliveries/replay", json_body=body)[
            "data"
        ]

    def rotate_webhook_secret(self) -> str:
        """A new webhook secret; the previous one keeps signing for 24 hours."""
        return self._request("POST", "/v1/webhook-secret/rotate")["webhook_secret"]

    # --- waiting ---

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the task is terminal or waits for input; returns it.

        Reads the task once, then long-polls (``?wait=``, up to 30 s a request) with
        ``If-None-Match``, so a change that happens between two requests answers at
        once. When an answer comes back early with nothing changed (a server without
        long polling), or the server is unavailable, it backs off exponentially from
        1 s to 30 s, never sooner than a ``Retry-After`` asks. Raises
        :class:`WaitTimeout` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pauses = 0  # pauses since the last change: the backoff's retry number
        long_poll = True
        task: dict[str, Any] | None = None
        etag: str | None = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(task_id, timeout or 0.0, task)
            first = task is None
            wait_for = None
            if not first and long_poll:
                wait_for = int(min(LONG_POLL_MAX_SECONDS, remaining or LONG_POLL_MAX_SECONDS))
                wait_for = wait_for or None  # under a second left: a plain read, then a pause
            started = time.monotonic()
            pause = 0.0
            try:
                fresh, headers = self._get_task(task_id, wait_for, etag)
            except ValidationError as exc:
                if long_poll and exc.errors and "wait" in exc.errors:
                    long_poll = False  # a server without ?wait=: plain polling
                    continue
                raise
            except (NetworkError, Unavailable, RateLimited, ServerError) as exc:
                retry_after = exc.retry_after if isinstance(exc, APIError) else None
                pauses += 1
                pause = max(POLL_BACKOFF.delay(pauses), retry_after or 0.0)
            else:
                new_etag = headers.get("ETag")
                changed = fresh is not None and (new_etag is None or new_etag != etag)
                if fresh is not None:
                    task, etag = fresh, new_etag
                assert task is not None
                if task["status"] in SETTLED_STATUSES:
                    return task
                if changed:
                    pauses = 0
                early = wait_for is not None and time.monotonic() - started < wait_for / 2
                if not first and (wait_for is None or (early and not changed)):
                    pauses += 1
                    pause = max(POLL_BACKOFF.delay(pauses), _retry_after(headers) or 0.0)
            if pause:
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)

    # --- events ---

    def events(
        self, task_id: str, *, after: int = 0, follow: bool = False, page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        """The task's events with ``seq > after``, oldest first.

        Without ``follow``: the events so far, page by page. With ``follow``: a
        Server-Sent Events stream that reconnects (resuming after the last ``seq`` seen)
        until the task's terminal event has been yielded.
        """
        if not follow:
            yield from self._event_pages(task_id, after, page_size)
            return
        last_seq = after
        failures = 0  # reconnects since the last event: the backoff's retry number
        while True:
            try:
                for event in self._event_stream(task_id, last_seq):
                    last_seq = event["seq"]
                    failures = 0
                    yield event
                    if event["type"] in TERMINAL_EVENT_TYPES:
                        return
            except _NoStream:
                yield from self._follow_by_polling(task_id, last_seq, page_size)
                return
            except (NetworkError, Unavailable, ServerError, RateLimited) as exc:
                failures += 1
                time.sleep(
                    max(POLL_BACKOFF.delay(failures), getattr(exc, "retry_after", None) or 0.0)
                )
                continue
            # The stream ended without the terminal event (a proxy cut it): resume after
            # the last seq seen, or read the rest as pages if the task finished meanwhile.
            if self.get(task_id)["status"] in TERMINAL_STATUSES:
                yield from self._event_pages(task_id, last_seq, page_size)
                return

    def _event_pages(self, task_id: str, after: int, page_size: int) -> Iterator[dict[str, Any]]:
        while True:
            page = self._request(
                "GET", f"/v1/tasks/{task_id}/events", params={"after": after, "limit": page_size}
            )
            for event in page["data"]:
                after = event["seq"]
                yield event
            if not page.get("next_cursor"):
                return
            after = int(page["next_cursor"])

    def _follow_by_polling(
        self, task_id: str, after: int, page_size: int
    ) -> Iterator[dict[str, Any]]:
        """``follow`` for a server without SSE: read pages, long-poll the task between."""
        while True:
            for event in self._event_pages(task_id, after, page_size):
                after = event["seq"]
                yield event
                if event["type"] in TERMINAL_EVENT_TYPES:
                    return
            self.get(task_id, wait=LONG_POLL_MAX_SECONDS)

    def _event_stream(self, task_id: str, after: int) -> Iterator[dict[str, Any]]:
        headers = {**self._headers, "Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = str(after)
        try:
            response = self._session.get(
                self.base_url + f"/v1/tasks/{task_id}/events",
                headers=headers,
                stream=True,
                timeout=(self.timeout, LONG_POLL_MAX_SECONDS * 4),
            )
        except requests.RequestException as exc:
            raise NetworkError(f"GET events stream: {exc}") from exc
        with response:
            if response.status_code >= 400:
                response.content  # noqa: B018  (read the problem body)
                raise error_for(response)
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                raise _NoStream()
            try:
                for sse in _parse_sse(response.iter_content(chunk_size=None)):
                    if sse.get("data"):
                        yield json.loads(sse["data"])
            except requests.RequestException as exc:
                raise NetworkError(f"events stream broken: {exc}") from exc

    # --- plumbing ---

    def _get_task(
        self, task_id: str, wait: float | None, etag: str | None = None
    ) -> tuple[dict[str, Any] | None, Any]:
        """The task and the answer's headers; ``None`` for the task on ``304`` (``etag``
        is still current)."""
        params = {} if wait is None else {"wait": wait}
        response = self._send(
            "GET",
            f"/v1/tasks/{task_id}",
            params=params,
            headers={"If-None-Match": etag} if etag else None,
            timeout=self.timeout + (wait or 0),
            retry_statuses=frozenset({502, 503, 504}),
            retry_network=True,
        )
        if response.status_code == 304:
            return None, response.headers
        return response.json(), response.headers

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        retry_statuses: frozenset[int] | None = None,
        retry_network: bool | None = None,
    ) -> Any:
        if retry_statuses is None:
            retry_statuses = frozenset({502, 503, 504}) if method == "GET" else frozenset()
        if retry_network is None:
            retry_network = method == "GET"
        response = self._send(
            method,
            path,
            params=params,
            json_body=json_body,
            headers=headers,
            timeout=self.timeout,
            retry_statuses=retry_statuses,
            retry_network=retry_network,
        )
        return response.json()

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float,
        retry_statuses: frozenset[int],
        retry_network: bool,
        done_on_retry: frozenset[int] = frozenset(),
    ) -> requests.Response:
        """One call, retried as allowed; returns a 2xx response or raises.

        ``done_on_retry``: statuses that mean success when they answer a retry (a
        ``404`` to a repeated ``DELETE`` whose first answer was lost)."""
        all_headers = {**self._headers, **(headers or {})}
        data = None
        if json_body is not None:
            data = json.dumps(json_body)
            all_headers["Content-Type"] = "application/json"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            try:
                response = self._session.request(
                    method,
                    self.base_url + path,
                    params=query,
                    data=data,
                    headers=all_headers,
                    timeout=(min(self.timeout, 10.0), timeout),
                )
            except requests.RequestException as exc:
                if not retry_network or attempt >= self.max_retries:
                    raise NetworkError(f"{method} {path}: {exc}") from exc
                self._backoff(attempt, None)
                attempt += 1
                continue
            if response.status_code < 400 or (attempt and response.status_code in done_on_retry):
                return response
            # A 429 was refused before any work was done: safe to repeat for any method.
            retryable = response.status_code in retry_statuses or response.status_code == 429
            if retryable and attempt < self.max_retries:
                self._backoff(attempt, _retry_after(response.headers))
                attempt += 1
                continue
            raise error_for(response)

    @staticmethod
    def _backoff(attempt: int, retry_after: float | None) -> None:
        # Never sooner than Retry-After (at most a minute of it).
        delay = REQUEST_RETRY.delay(attempt + 1)
        time.sleep(max(delay, min(retry_after or 0.0, 60.0)))


class _NoStream(Exception):
    """The server answered the events request with JSON, not an event stream."""


def _parse_sse(chunks: Iterator[bytes]) -> Iterator[dict[str, str]]:
    """Server-Sent Events from a byte stream: ``{"event", "id", "data"}`` per block."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # a character may span two chunks
    buffer = ""
    fields: dict[str, str] = {}
    data_lines: list[str] = []
    for chunk in chunks:
        buffer += decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        while True:
            newline = buffer.find("\n")
            if newline < 0:
                break
            line, buffer = buffer[:newline].rstrip("\r"), buffer[newline + 1 :]
            if not line:
                if data_lines or fields:
                    yield {**fields, "data": "\n".join(data_lines)}
                fields, data_lines = {}, []
                continue
            if line.startswith(":"):  # a comment: keep-alive
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data_lines.append(value)
            elif name in ("event", "id", "retry"):
                fields[name] = value
