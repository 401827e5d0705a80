"""A tiny TCP proxy on 127.0.0.1 in front of the web process that misbehaves on purpose.

``LosingProxy(upstream_port, lose=1)`` forwards the first ``lose`` HTTP requests to the
web process, reads the web process's whole answer, and then closes the caller's
connection without sending a byte of it: the request was served, its response lost.
``reject=N`` answers the first N requests itself with ``503`` and ``Retry-After`` (the
web process never sees them). Every later connection is piped through untouched.
"""

from __future__ import annotations

import socket
import struct
import threading


def _read_http_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message (headers and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class LosingProxy:
    def __init__(self, upstream_port: int, *, lose: int = 0, reject: int = 0):
        self.upstream_port = upstream_port
        self._lose = lose
        self._reject = reject
        self.lost_responses: list[bytes] = []
        self.rejected = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)  # so the accept loop notices a stop
        self.port = self._server.getsockname()[1]
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LosingProxy:
        self._accept_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self._accept_thread.join(5)
        self._server.close()
        for sock in self._sockets:  # idle keep-alive connections end here
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._sockets.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            reject = self._reject > 0
            lose = not reject and self._lose > 0
            if reject:
                self._reject -= 1
            elif lose:
                self._lose -= 1
        with client:
            if reject:
                _read_http_message(client)
                self.rejected += 1
                body = b'{"type":"about:blank","title":"Busy","status":503,"code":"unavailable"}'
                client.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                    b"Content-Type: application/problem+json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                return
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                self._sockets.append(upstream)
                if lose:
                    upstream.sendall(_read_http_message(client))
                    self.lost_responses.append(_read_http_message(upstream))
                    # Drop the caller's connection abruptly: the answer never reaches it.
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                self._pipe(client, upstream)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        back = threading.Thread(target=copy, args=(b, a), daemon=True)
        back.start()
        copy(a, b)
        back.join(30)
