"""A lossy HTTP proxy: forwards each request to the web process and, when told to,
throws the answer away and cuts the client's connection.

That is the "lost 202" of RUNTIME.md made real: the server did the work and answered,
and the client never heard. Only the network path is faked; the web process, its
database and its broker are the real ones.
"""

from __future__ import annotations

import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class LossyProxy:
    """``url`` forwards to ``upstream``; :meth:`lose_next` drops the next answers."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.lost: list[requests.Response] = []  # answers the client never received
        self._to_lose = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                answer = requests.request(
                    self.command,
                    proxy.upstream + self.path,
                    data=body,
                    headers=headers,
                    timeout=30,
                )
                if proxy._take_loss():
                    proxy.lost.append(answer)
                    # Reset the connection: the client sees it dropped, no answer at all.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    return
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward  # noqa: N815 (http.server's naming)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def lose_next(self, count: int = 1) -> None:
        with self._lock:
            self._to_lose += count

    def _take_loss(self) -> bool:
        with self._lock:
            if self._to_lose > 0:
                self._to_lose -= 1
                return True
            return False

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
