"""A real local webhook receiver: a threaded ``http.server`` on 127.0.0.1.

It stands in for a customer's endpoint (the only fake our tests allow). Each request
is recorded with its arrival time, headers and raw body; what it answers is decided by
``respond(n)`` for the n-th request (0-based), so a test scripts "fail twice, then 200".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    at: float  # time.time() when the request arrived
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


Responder = Callable[[int], Answer]


def always(status: int, **headers: str) -> Responder:
    return lambda _n: Answer(status, dict(headers))


def fail_then_ok(failures: int, status: int = 500) -> Responder:
    return lambda n: Answer(status if n < failures else 200)


def fail_first_per_id(receiver: Receiver, status: int = 500) -> Responder:
    """Answer ``status`` to the first request of each ``webhook-id``, 200 afterwards."""

    def respond(n: int) -> Answer:
        webhook_id = receiver.requests[n].headers.get("webhook-id")
        earlier = [r for r in receiver.requests[:n] if r.headers.get("webhook-id") == webhook_id]
        return Answer(200 if earlier else status)

    return respond


class Receiver:
    """Start with ``with Receiver(respond) as r:``; ``r.url`` is where to send."""

    def __init__(self, respond: Responder | None = None, host: str = "127.0.0.1"):
        self.respond: Responder = respond or always(200)
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    n = len(receiver.requests)
                    receiver.requests.append(
                        Received(
                            time.time(),
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                answer = receiver.respond(n)
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
