"""A closed-loop HTTP/1.1 load generator (wrk-like) in plain asyncio.

``connections`` keep-alive connections each send a request, read the whole answer and
send the next, for ``duration`` seconds after a ``warmup``. Every request is built by a
callable, so each can carry its own ``Idempotency-Key``. It needs nothing beyond the
standard library, so a fresh machine runs it; its own cost is measured against the
``return 202`` endpoint and reported beside the figures (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.stats import percentile

RequestFactory = Callable[[int], bytes]


@dataclass
class LoadResult:
    """What one load run measured (after the warm-up)."""

    connections: int
    duration: float
    latencies: list[float] = field(default_factory=list)  # seconds, one per request
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0
    cpu_seconds: float = 0.0  # this process's CPU while loading (the generator's cost)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    def p(self, q: float) -> float:
        """Latency percentile in milliseconds."""
        return percentile(self.latencies, q) * 1000.0

    def as_dict(self) -> dict:
        return {
            "connections": self.connections,
            "requests": self.requests,
            "rps": self.rps,
            "p50_ms": self.p(50),
            "p99_ms": self.p(99),
            "statuses": dict(self.statuses),
            "errors": self.errors,
            "loadgen_cpu_s": self.cpu_seconds,
        }


def http_request(
    method: str, path: str, host: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, server closes the connection, body) of one answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    chunked = False
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if chunked:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(length) if length else b""
    return status, close, body


async def request_once(
    host: str, port: int, data: bytes, timeout: float = 60.0
) -> tuple[int, bytes]:
    """Send one request on a fresh connection; (status, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        status, _, body = await asyncio.wait_for(_read_response(reader), timeout)
        return status, body
    finally:
        writer.close()


async def _run(
    host: str,
    port: int,
    make_request: RequestFactory,
    connections: int,
    duration: float,
    warmup: float,
    max_requests: int | None,
    timeout: float | None = None,
) -> LoadResult:
    result = LoadResult(connections=connections, duration=duration)
    start = time.perf_counter()
    measure_from = start + warmup
    deadline = measure_from + duration
    counter = iter(range(1 << 62))

    async def one_connection() -> None:
        reader = writer = None
        while True:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            i = next(counter)
            if max_requests is not None and i >= max_requests:
                break
            data = make_request(i)
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            try:
                writer.write(data)
                status, close, _ = await asyncio.wait_for(_read_response(reader), timeout)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                result.errors += 1
                writer.close()
                writer = None
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                result.latencies.append(t1 - t0)
                result.statuses[status] += 1
            if close:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    result.cpu_seconds = time.process_time() - cpu0
    return result


def run_load(
    port: int,
    make_request: RequestFactory,
    *,
    connections: int,
    duration: float,
    warmup: float = 1.0,
    max_requests: int | None = None,
    host: str = "127.0.0.1",
    timeout: float | None = None,
) -> LoadResult:
    """Load ``host:port`` with ``connections`` closed-loop connections for ``duration``
    seconds after ``warmup`` seconds (or until ``max_requests`` were sent); every
    request comes from ``make_request(i)``. An answer slower than ``timeout`` seconds
    counts as an error (and its connection is replaced)."""
    return asyncio.run(
        _run(host, port, make_request, connections, duration, warmup, max_requests, timeout)
    )
