"""The ``waiters`` section: the web tier under 1,000 waiting clients, and the cost of the
rate limit (issue 13; V2.md 8 and 12).

- One ``outlast web`` process line (``WEB_CONCURRENCY=2``) per worker class compared
  (``gevent``, the default, and ``gthread`` with 16 threads per process, the previous
  default). A closed loop of other requests (another tenant reading a task, its event
  page and its task list, 8 connections) runs first alone, then while 1,000 clients
  wait: 500 SSE streams and 500 ``?wait=30`` long polls (re-issued as each answers), over
  10 tenants, on tasks that stay ``pending`` (no worker runs: nothing wakes them). The
  loop's p50/p99 with waiters against without (goal: p99 within 2x, no error), and
  the web process line's RSS (master and workers) with the waiters open.
- Submission throughput and p99 with the rate limit on (a limit far above the load, so
  that every request is counted and none refused) and off (``0``), on two web process
  lines side by side, alternated round by round (goal: within 10%).

Every connection is to 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil

from app.store import tenants
from bench.infra import Infra, group_rss_bytes
from bench.loadgen import LoadResult, http_request, run_load

WAITER_TENANTS = 10
RATE_LIMIT_FAR_ABOVE_THE_LOAD = 1_000_000


@dataclass(frozen=True)
class WaitersSize:
    sse: int = 500
    long_polls: int = 500
    loop_seconds: float = 10.0
    loop_connections: int = 8
    submit_seconds: float = 5.0
    submit_rounds: int = 4
    request_timeout: float = 10.0  # a loop request slower than this counts as an error
    settle_seconds: float = 5.0


WAITER_SIZES = {
    "smoke": WaitersSize(
        sse=10, long_polls=10, loop_seconds=1.0, submit_seconds=0.5, submit_rounds=1
    ),
    "small": WaitersSize(
        sse=100, long_polls=100, loop_seconds=3.0, submit_seconds=2.0, submit_rounds=1
    ),
    "full": WaitersSize(),
}


@dataclass
class WaiterCrowd:
    """SSE streams and long polls held open from a thread of their own (asyncio)."""

    port: int
    targets: list[tuple[str, str]]  # (api key, task id) per tenant
    sse: int
    long_polls: int
    opened: int = 0
    statuses: dict = field(default_factory=dict)
    errors: int = 0
    polls_answered: int = 0

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _request(self, i: int, path: str, accept: str) -> bytes:
        key, task_id = self.targets[i % len(self.targets)]
        return http_request(
            "GET",
            path.format(task_id=task_id),
            f"127.0.0.1:{self.port}",
            {"Authorization": f"Bearer {key}", "Accept": accept},
        )

    def _count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    async def _stream(self, i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(self._request(i, "/v1/tasks/{task_id}/events", "text/event-stream"))
            head = await reader.readuntil(b"\r\n\r\n")
            self._count(int(head.split(b" ", 2)[1]))
            self.opened += 1
            while not self._stop.is_set():  # read (and drop) events and keep-alives
                try:
                    if not await asyncio.wait_for(reader.read(65536), 1.0):
                        break
                except TimeoutError:
                    continue
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            self.errors += 1

    async def _long_poll(self, i: int) -> None:
        from bench.loadgen import _read_response

        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            first = True
            while not self._stop.is_set():
                writer.write(self._request(i, "/v1/tasks/{task_id}?wait=30", "application/json"))
                if first:  # waiting from now on (a 429 would answer at once: see statuses)
                    self.opened += 1
                    first = False
                read = asyncio.ensure_future(_read_response(reader))
                stop = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    break
                stop.cancel()
                status, close, _ = read.result()
                self._count(status)
                self.polls_answered += 1
                if close:
                    break
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            self.errors += 1

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            tasks = []
            for i in range(self.sse):
                tasks.append(asyncio.ensure_future(self._stream(i)))
            for i in range(self.long_polls):
                tasks.append(asyncio.ensure_future(self._long_poll(i)))
            self._ready.set()
            await asyncio.gather(*tasks)

        asyncio.run(main())

    def start(self, timeout: float = 120.0) -> None:
        """Open every waiter; returns once each has its first answer head (or timeout)."""
        self._thread.start()
        self._ready.wait(10)
        deadline = time.monotonic() + timeout
        while self.opened + self.errors < self.sse + self.long_polls:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def as_dict(self) -> dict:
        return {
            "sse": self.sse,
            "long_polls": self.long_polls,
            "opened": self.opened,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "errors": self.errors,
            "long_poll_answers": self.polls_answered,
        }


def _reader_requests(port: int, key: str, task_id: str):
    paths = [f"/v1/tasks/{task_id}", f"/v1/tasks/{task_id}/events", "/v1/tasks?limit=5"]
    headers = {"Authorization": f"Bearer {key}"}
    built = [http_request("GET", p, f"127.0.0.1:{port}", headers) for p in paths]
    return lambda i: built[i % len(built)]


def _web(infra: Infra, stack, name: str, env: dict[str, str]):
    """Another ``outlast web`` line of ``stack`` on a port of its own; (process, port)."""
    port = infra.free_port()
    proc = infra.start(name, ["outlast", "web"], {**stack.env, **env, "PORT": str(port)})
    infra.wait_http(port, "/healthz")
    return proc, port


def measure_waiters(infra: Infra, size: WaitersSize, log) -> dict:
    """The section's figures (see the module docstring)."""
    from bench.outlast_side import OutlastStack

    stack = OutlastStack(
        infra, name="waiters", env={"OUTLAST_RATE_LIMIT_PER_SECOND": "0"}, web_workers=2
    )
    results: dict = {"size": size.__dict__, "classes": {}, "rate_limit": {}}
    try:
        # Tenants: 10 whose clients wait, one reader; one pending task each.
        keys = []
        with stack.engine.begin() as conn:
            for i in range(WAITER_TENANTS + 1):
                keys.append(tenants.create(conn, f"waiter-{i}-{uuid.uuid4().hex[:6]}").api_key)
        for worker_class, extra in (
            ("gevent", {"OUTLAST_WEB_WORKER_CLASS": "gevent"}),
            ("gthread", {"OUTLAST_WEB_WORKER_CLASS": "gthread", "OUTLAST_WEB_THREADS": "16"}),
        ):
            proc, port = _web(infra, stack, f"waiters-web-{worker_class}", extra)
            try:
                results["classes"][worker_class] = _one_class(
                    stack, proc, port, keys, size, log, worker_class
                )
            finally:
                infra.stop(proc)
        results["rate_limit"] = _rate_limit_cost(infra, stack, size, log)
    finally:
        stack.close()
    return results


def _submit_task(port: int, key: str) -> str:
    import requests

    answer = requests.post(
        f"http://127.0.0.1:{port}/v1/tasks",
        json={"agent": "echo", "input": {"message": "wait"}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    answer.raise_for_status()
    return answer.json()["id"]


def _one_class(stack, proc, port: int, keys: list[str], size: WaitersSize, log, name: str):
    reader_key = keys[-1]
    reader_task = _submit_task(port, reader_key)
    targets = [(key, _submit_task(port, key)) for key in keys[:-1]]
    loop = _reader_requests(port, reader_key, reader_task)

    def closed_loop() -> LoadResult:
        return run_load(
            port,
            loop,
            connections=size.loop_connections,
            duration=size.loop_seconds,
            warmup=1.0,
            timeout=size.request_timeout,
        )

    log(f"waiters/{name}: closed loop alone")
    alone = closed_loop()
    rss_idle = group_rss_bytes(proc)
    crowd = WaiterCrowd(port, targets, size.sse, size.long_polls)
    log(f"waiters/{name}: opening {size.sse} SSE streams + {size.long_polls} long polls")
    t0 = time.monotonic()
    crowd.start(timeout=60)
    opened_in = time.monotonic() - t0
    time.sleep(size.settle_seconds)  # let the web finish the waiters' first reads
    try:
        log(f"waiters/{name}: closed loop with {crowd.opened} waiters open")
        crowded = closed_loop()
        rss = group_rss_bytes(proc)
        processes = 1 + len(psutil.Process(proc.pid).children(recursive=True))
    finally:
        crowd.stop()
    return {
        "alone": alone.as_dict(),
        "with_waiters": crowded.as_dict(),
        "waiters": crowd.as_dict(),
        "seconds_to_open_waiters": opened_in,
        "rss_bytes_idle": rss_idle,
        "rss_bytes_with_waiters": rss,
        "web_processes": processes,
    }


def _rate_limit_cost(infra: Infra, stack, size: WaitersSize, log) -> dict:
    webs = {
        "on": _web(
            infra,
            stack,
            "waiters-web-rl-on",
            {"OUTLAST_RATE_LIMIT_PER_SECOND": str(RATE_LIMIT_FAR_ABOVE_THE_LOAD)},
        ),
        "off": _web(infra, stack, "waiters-web-rl-off", {"OUTLAST_RATE_LIMIT_PER_SECOND": "0"}),
    }
    runs: dict[str, list] = {"on": [], "off": []}
    try:
        for r in range(size.submit_rounds):
            for name in ["on", "off"] if r % 2 == 0 else ["off", "on"]:
                _, port = webs[name]
                stack.port = port  # submit_request names the port in its Host header
                log(f"waiters/rate limit {name}: round {r + 1}/{size.submit_rounds}")
                result = run_load(
                    port,
                    stack.submit_request,
                    connections=16,
                    duration=size.submit_seconds,
                    warmup=1.0,
                    timeout=size.request_timeout,
                )
                runs[name].append(result.as_dict())
    finally:
        for proc, _ in webs.values():
            infra.stop(proc)
    return runs


def render(waiters: dict) -> str:
    """The section as Markdown (appended to report.md)."""
    lines = ["## Waiters (1,000 SSE streams and long polls) and the rate limit's cost", ""]
    lines.append(
        "| web worker class | loop alone p50 / p99 ms | with waiters p50 / p99 ms | p99 ratio "
        "| loop errors alone / with | waiters open | RSS idle / with waiters MB |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name, r in waiters.get("classes", {}).items():
        a, w = r["alone"], r["with_waiters"]
        ratio = w["p99_ms"] / a["p99_ms"] if a["p99_ms"] else float("nan")
        lines.append(
            f"| {name} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {w['p50_ms']:.1f} / "
            f"{w['p99_ms']:.1f} | {ratio:.2f} | {a['errors']} / {w['errors']} "
            f"(requests {a['requests']} / {w['requests']}) | {r['waiters']['opened']} of "
            f"{r['waiters']['sse'] + r['waiters']['long_polls']} "
            f"(statuses {r['waiters']['statuses']}) | {r['rss_bytes_idle'] / 2**20:.0f} / "
            f"{r['rss_bytes_with_waiters'] / 2**20:.0f} |"
        )
    lines += [
        "",
        "| rate limit | submissions/s per round | p99 ms per round | statuses | errors |",
    ]
    lines.append("|---|---|---|---|---|")
    for name, runs in waiters.get("rate_limit", {}).items():
        rps = ", ".join(f"{r['rps']:.0f}" for r in runs)
        p99 = ", ".join(f"{r['p99_ms']:.1f}" for r in runs)
        statuses = [r["statuses"] for r in runs]
        errors = sum(r["errors"] for r in runs)
        median = sorted(r["rps"] for r in runs)[len(runs) // 2]
        lines.append(f"| {name} | {rps} (median {median:.0f}) | {p99} | {statuses} | {errors} |")
    return "\n".join(lines) + "\n"
