"""Local HTTP servers standing in for the world outside Outlast (the only fakes allowed):
a ledger that counts requests per Idempotency-Key, a web site for ``research``, and an
OpenAI-compatible chat-completions stub."""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A handler returns (status, headers, body bytes); it may block (a slow callee).
Handler = Callable[["Received"], tuple[int, dict[str, str], bytes]]


class Received:
    """One request as the server saw it."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        self.method = method
        self.path = path
        self.headers = headers
        self.raw = body

    @property
    def json(self) -> Any:
        return json.loads(self.raw or b"null")

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")


class LocalServer:
    """A threaded HTTP server on 127.0.0.1; ``handler`` answers every request."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[Received] = []
        self.released = threading.Event()  # set at close: frees handlers that block
        self._lock = threading.Lock()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                received = Received(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with server._lock:
                    server.requests.append(received)
                status, headers, payload = server.handler(received)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        class _Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client killed mid-request (on purpose) is not news

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, path_prefix: str = "/") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def keys(self, path_prefix: str = "/") -> collections.Counter[str | None]:
        """Requests per Idempotency-Key."""
        with self._lock:
            return collections.Counter(
                r.key for r in self.requests if r.path.startswith(path_prefix)
            )

    def close(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()


def json_answer(status: int, value: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()
