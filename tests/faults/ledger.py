"""The ledger: a local HTTP server that counts side effects.

It stands in for the world outside Outlast (the only fake the test rules allow): the
``calls`` agent POSTs ``{"task_id", "step", "key"}`` to ``/calls`` with an
``Idempotency-Key`` header, and webhooks POST signed events to ``/hooks`` with a
``webhook-id`` header. Every request is recorded with its arrival and answer times, so a
test can count requests per key, see which call was in flight when it killed a worker,
and hold a call open (a "long tool call") or answer it with an error.

A test shapes the answers with :meth:`Ledger.add_rule`: the first rule whose ``match``
accepts a request and has uses left decides its delay and status. Delays wait on an
event that :meth:`Ledger.close` sets, so no handler thread outlives the test.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass
class Request:
    """One request the ledger received."""

    seq: int
    path: str
    headers: dict[str, str]
    body: Any
    arrived: float  # time.monotonic()
    client_port: int = 0  # the caller's TCP port: tells which process made the call
    method: str = "POST"  # DELETE: the calls agent's undo (V2.md 10)
    answered: float | None = None  # None while the handler holds it (in flight)
    status: int | None = None

    @property
    def key(self) -> str | None:
        """The side effect's identity: ``Idempotency-Key`` (calls) or ``webhook-id`` (hooks)."""
        return self.headers.get("idempotency-key") or self.headers.get("webhook-id")

    @property
    def task_id(self) -> str | None:
        if isinstance(self.body, dict):
            if "task_id" in self.body:
                return self.body["task_id"]
            task = (self.body.get("data") or {}).get("task") or {}
            return task.get("id")
        return None

    @property
    def step(self) -> int | None:
        return self.body.get("step") if isinstance(self.body, dict) else None


@dataclasses.dataclass
class Rule:
    """How to answer the requests ``match`` accepts: wait ``delay`` s, then ``status``."""

    match: Callable[[Request], bool]
    delay: float = 0.0
    status: int = 200
    times: int | None = None  # None: every matching request
    used: int = 0

    def take(self, request: Request) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if not self.match(request):
            return False
        self.used += 1
        return True


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A killed worker's keep-alive connection resets; that is the test, not an error.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class Ledger:
    """A threaded HTTP server on 127.0.0.1 recording every request it gets."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closing = threading.Event()
        ledger = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                headers = {k.lower(): v for k, v in self.headers.items()}
                request, rule = ledger._arrive(
                    self.path, headers, body, self.client_address[1], self.command
                )
                if rule is not None and rule.delay:
                    ledger._closing.wait(rule.delay)
                status = rule.status if rule is not None else 200
                payload = json.dumps({"ok": 200 <= status < 300, "seq": request.seq}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the caller was killed while we held its request
                ledger._answer(request, status)

            do_DELETE = do_POST  # noqa: N815 (the undos of the calls agent)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    # --- set-up ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_rule(
        self,
        match: Callable[[Request], bool],
        *,
        delay: float = 0.0,
        status: int = 200,
        times: int | None = None,
    ) -> Rule:
        """Answer matching requests after ``delay`` s with ``status`` (``times`` at most)."""
        rule = Rule(match, delay, status, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def hold_call(self, step: int, seconds: float, times: int | None = 1) -> Rule:
        """Hold the ``calls`` agent's request for ``step`` open ``seconds`` (a long tool call)."""
        return self.add_rule(
            lambda r: r.path.startswith("/calls") and r.step == step, delay=seconds, times=times
        )

    def fail_first_per_key(self, path: str, failures: int, status: int = 503) -> None:
        """Answer ``status`` to the first ``failures`` requests of every key on ``path``."""
        seen: collections.Counter[str] = collections.Counter()
        guard = threading.Lock()

        def match(request: Request) -> bool:
            if not request.path.startswith(path):
                return False
            with guard:
                seen[request.key or ""] += 1
                return seen[request.key or ""] <= failures

        self.add_rule(match, status=status)

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        """Release every held request and stop serving."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    # --- the server's side ------------------------------------------------------------------

    def _arrive(
        self, path: str, headers: dict[str, str], body: Any, client_port: int, method: str
    ) -> tuple[Request, Rule | None]:
        with self._changed:
            request = Request(
                len(self.requests),
                path,
                headers,
                body,
                time.monotonic(),
                client_port,
                method=method,
            )
            self.requests.append(request)
            rule = next((r for r in self.rules if r.take(request)), None)
            self._changed.notify_all()
            return request, rule

    def _answer(self, request: Request, status: int) -> None:
        with self._changed:
            request.answered = time.monotonic()
            request.status = status
            self._changed.notify_all()

    # --- what a test reads ------------------------------------------------------------------

    def snapshot(self, path: str | None = None, task_id: str | None = None) -> list[Request]:
        """The requests so far (on ``path``, for ``task_id``), oldest first."""
        with self._lock:
            found = list(self.requests)
        if path is not None:
            found = [r for r in found if r.path.startswith(path)]
        if task_id is not None:
            found = [r for r in found if r.task_id == task_id]
        return found

    def counts(self, path: str | None = None, task_id: str | None = None) -> dict[str, int]:
        """Requests per key (Idempotency-Key or webhook-id)."""
        return dict(collections.Counter(r.key for r in self.snapshot(path, task_id)))

    def in_flight(self, path: str = "/calls") -> list[Request]:
        """Requests that arrived and have not been answered yet."""
        return [r for r in self.snapshot(path) if r.answered is None]

    def wait_for(
        self, predicate: Callable[[list[Request]], Any], timeout: float = 30.0, what: str = ""
    ) -> Any:
        """Block until ``predicate(all requests)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate(list(self.requests))
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"ledger: timed out after {timeout}s waiting for {what or predicate}; "
                        f"{len(self.requests)} requests so far"
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_in_flight(self, task_id: str, step: int, timeout: float = 30.0) -> Request:
        """The ``calls`` request for (task, step) that is being held open right now."""

        def held(requests: list[Request]) -> Request | None:
            for r in requests:
                if (
                    r.path.startswith("/calls")
                    and r.task_id == task_id
                    and r.step == step
                    and r.answered is None
                ):
                    return r
            return None

        return self.wait_for(held, timeout, what=f"a call of {task_id} step {step} in flight")

    def call_keys_by_step(self, task_id: str) -> dict[int, set[str]]:
        """For one task: the keys the ``calls`` agent sent, per step."""
        by_step: dict[int, set[str]] = collections.defaultdict(set)
        for r in self.snapshot("/calls", task_id):
            by_step[r.step].add(r.key)
        return dict(by_step)
