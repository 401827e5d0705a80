"""A tarpit webhook receiver: accepts a connection, reads the request, then trickles one
byte of an answer a second and never finishes it.

It stands in for a customer's slow endpoint (the only kind of fake the test rules allow).
Each connection is recorded with when it was accepted and when the sender gave up on it
(the peer closed or reset the socket), and the most connections ever open at once.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import threading
import time


@dataclasses.dataclass
class Connection:
    accepted: float  # time.monotonic()
    closed: float | None = None  # when the sender cut it off

    @property
    def seconds(self) -> float | None:
        return None if self.closed is None else self.closed - self.accepted


class Tarpit:
    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.connections: list[Connection] = []
        self.max_open = 0
        self._open = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hooks"
        self._threads: list[threading.Thread] = []
        acceptor = threading.Thread(target=self._accept, name="tarpit-accept", daemon=True)
        acceptor.start()
        self._threads.append(acceptor)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = Connection(time.monotonic())
            with self._lock:
                self.connections.append(record)
                self._open += 1
                self.max_open = max(self.max_open, self._open)
            t = threading.Thread(target=self._trickle, args=(sock, record), daemon=True)
            t.start()
            self._threads.append(t)

    def _trickle(self, sock: socket.socket, record: Connection) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: " + b"x" * 100000
        try:
            sent = 0
            next_byte = time.monotonic() + self.interval
            while not self._closing.is_set() and sent < len(answer):
                wait = max(0.0, min(0.2, next_byte - time.monotonic()))
                readable, _, _ = select.select([sock], [], [], wait)
                if readable and sock.recv(65536) == b"":
                    return  # the sender closed its side: noticed at once
                if time.monotonic() >= next_byte:
                    sock.sendall(answer[sent : sent + 1])
                    sent += 1
                    next_byte += self.interval
        except OSError:
            return
        finally:
            if record.closed is None:
                record.closed = time.monotonic()
            with self._lock:
                self._open -= 1
            sock.close()

    def open_now(self) -> int:
        with self._lock:
            return self._open

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for t in self._threads:
            t.join(5)
