"""Waiting clients against a real gunicorn web (the Procfile's ``web`` line): SSE streams
and long polls hold no request thread that other clients need, a tenant's waiters are
capped across web processes (429), a stream ends after OUTLAST_SSE_MAX_SECONDS and
resumes without a repeated or missing event, and the rate limit is shared by every web
process.

One module-scoped stack: two web processes (one worker process each, so a stalled
worker would show) on one database and Redis, no Celery worker (tasks stay ``pending``,
so their streams stay open; events are appended from the test through the lifecycle).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from app.store import db, lifecycle
from outlast.client import Client
from tests.api.conftest import checkpoint, start
from tests.conftest import fresh_stack
from tests.harness import Stack

CAP = 12  # OUTLAST_MAX_WAITERS_PER_TENANT of this stack
SSE_MAX_SECONDS = 2.0  # on a third web process, started for that test
RATE = 50  # OUTLAST_RATE_LIMIT_PER_SECOND: quota 100 per 2 s


@dataclass
class Webs:
    stack: Stack
    port_a: int
    port_b: int
    keys: dict[str, str]  # tenant name -> API key

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def webs(servers, tmp_path_factory) -> Iterator[Webs]:
    names = ("s0", "s1", "s2", "s3", "reader", "resumer", "burst", "bystander")
    extra = {
        "WEB_CONCURRENCY": "1",
        "OUTLAST_MAX_WAITERS_PER_TENANT": str(CAP),
        "OUTLAST_RATE_LIMIT_PER_SECOND": str(RATE),
    }
    log_dir = Path(tmp_path_factory.mktemp("waiter-logs"))
    with fresh_stack(servers, log_dir, names, **extra) as fresh:
        web_a = fresh.stack.start("web")
        fresh.stack.wait_ready()
        web_b = fresh.stack.start("web")
        fresh.stack.wait_ready()
        keys = {name: made.api_key for name, made in fresh.tenants.items()}
        yield Webs(fresh.stack, web_a.port, web_b.port, keys)


def headers(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def submit(webs: Webs, tenant: str, **input_: object) -> str:
    response = requests.post(
        webs.url(webs.port_a) + "/v1/tasks",
        json={"agent": "echo", "input": {"message": "wait", **input_}},
        headers=headers(webs.keys[tenant]),
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def open_stream(port: int, task_id: str, key: str) -> tuple[socket.socket, int, str]:
    """An SSE request on a raw socket, kept open: (socket, status, head and first bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    status = int(received.split(b" ", 2)[1])
    return sock, status, received.decode("latin-1")


def timed_reads(webs: Webs, task_id: str, n: int) -> list[float]:
    """``n`` reads by the reader tenant, alternating the task, the list and the events."""
    key = webs.keys["reader"]
    paths = [f"/v1/tasks/{task_id}", "/v1/tasks?limit=5", f"/v1/tasks/{task_id}/events"]
    seconds = []
    with requests.Session() as session:
        for i in range(n):
            t0 = time.perf_counter()
            response = session.get(
                webs.url(webs.port_a) + paths[i % 3], headers=headers(key), timeout=10
            )
            seconds.append(time.perf_counter() - t0)
            assert response.status_code == 200, response.text
    return seconds


def test_48_streams_of_4_tenants_leave_other_reads_fast_and_the_next_waiter_gets_429(webs):
    # Given one pending task per tenant (no worker: their streams stay open), and the
    # reader tenant's normal read time
    tasks = {tenant: submit(webs, tenant) for tenant in ("s0", "s1", "s2", "s3", "reader")}
    baseline = timed_reads(webs, tasks["reader"], 20)
    # When each of 4 tenants opens CAP (12) SSE streams, split over both web processes
    streams = []
    try:
        for tenant in ("s0", "s1", "s2", "s3"):
            for i in range(CAP):
                port = webs.port_a if i % 2 else webs.port_b
                sock, status, head = open_stream(port, tasks[tenant], webs.keys[tenant])
                streams.append(sock)
                assert status == 200, head
        assert len(streams) == 48
        # Then another tenant's 20 reads each answer in normal time
        during = timed_reads(webs, tasks["reader"], 20)
        limit = max(1.0, 10 * max(baseline))
        assert max(during) < limit, (baseline, during)
        # and its own long poll is a waiter like any other: served
        t0 = time.monotonic()
        response = requests.get(
            webs.url(webs.port_a) + f"/v1/tasks/{tasks['reader']}?wait=1",
            headers=headers(webs.keys["reader"]),
            timeout=10,
        )
        assert response.status_code == 200 and time.monotonic() - t0 >= 0.9
        # And the 13th waiter of a full tenant gets 429 rate_limited with Retry-After, on
        # either web process (the count is shared through Redis), stream or long poll
        for port in (webs.port_a, webs.port_b):
            sock, status, head = open_stream(port, tasks["s0"], webs.keys["s0"])
            sock.close()
            assert status == 429, head
            assert "\r\nretry-after: " in head.lower(), head
            response = requests.get(
                webs.url(port) + f"/v1/tasks/{tasks['s1']}?wait=5",
                headers=headers(webs.keys["s1"]),
                timeout=10,
            )
            assert response.status_code == 429, response.text
            assert response.json()["code"] == "rate_limited"
            assert int(response.headers["Retry-After"]) >= 1
        # When s0's task ends, its 12 streams end with it and free their slots
        requests.post(
            webs.url(webs.port_a) + f"/v1/tasks/{tasks['s0']}/cancel",
            headers=headers(webs.keys["s0"]),
            timeout=10,
        ).raise_for_status()
        fresh = submit(webs, "s0")

        def admitted() -> bool:
            sock, status, _ = open_stream(webs.port_a, fresh, webs.keys["s0"])
            sock.close()
            return status == 200

        deadline = time.monotonic() + 10
        while not admitted():
            assert time.monotonic() < deadline, "s0's slots were not freed"
            time.sleep(0.2)
    finally:
        for sock in streams:
            sock.close()


def _append_events(task_id: str, steps: int, every: float, done: threading.Event) -> None:
    """Steps checkpointed "by hand" (each appends task.step.completed), then completed."""
    try:
        token = start(task_id)
        for step in range(steps):
            time.sleep(every)
            token = checkpoint(task_id, step, token)
        with db.transaction() as conn:
            assert lifecycle.complete(conn, task_id, {"ok": True})
    finally:
        done.set()


def test_stream_ends_after_sse_max_seconds_and_resumes_without_repeat_or_gap(webs):
    # Given a task whose events keep coming for about 5 s (longer than two stream lives)
    key = webs.keys["resumer"]
    task_id = submit(webs, "resumer")
    done = threading.Event()
    writer = threading.Thread(target=_append_events, args=(task_id, 25, 0.2, done), daemon=True)
    # When a raw stream on a web process with OUTLAST_SSE_MAX_SECONDS=2 is read to its end
    short = webs.stack.start("web", {"OUTLAST_SSE_MAX_SECONDS": str(SSE_MAX_SECONDS)})
    try:
        webs.stack.wait_ready()
        writer.start()
        _stream_is_cut_and_resumed(webs, short.port, key, task_id)
    finally:
        webs.stack.stop(short)
        writer.join(30)
    assert done.is_set()


def _stream_is_cut_and_resumed(webs: Webs, port: int, key: str, task_id: str) -> None:
    url = webs.url(port) + f"/v1/tasks/{task_id}/events"
    t0 = time.monotonic()
    with requests.get(
        url, headers=headers(key, Accept="text/event-stream"), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    lived = time.monotonic() - t0
    # Then it ended after about SSE_MAX_SECONDS with a comment line, not the terminal event
    assert SSE_MAX_SECONDS - 0.1 <= lived < SSE_MAX_SECONDS + 3, lived
    assert lines[-1].startswith(":") and "Last-Event-ID" in lines[-1], lines[-3:]
    first_ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
    assert first_ids == list(range(1, len(first_ids) + 1)), first_ids
    # And resuming with Last-Event-ID continues at the next seq
    with requests.get(
        url,
        headers=headers(key, Accept="text/event-stream", **{"Last-Event-ID": str(first_ids[-1])}),
        stream=True,
        timeout=30,
    ) as response:
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("id: "):
                assert int(line[4:]) == first_ids[-1] + 1
                break
    # And the Python client (as `outlast events --follow`) reconnects by itself across
    # every cut: each event once, in order, through the terminal one
    with Client(webs.url(port), key, timeout=10) as client:
        t0 = time.monotonic()
        seqs = [event["seq"] for event in client.events(task_id, follow=True)]
        followed = time.monotonic() - t0
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert len(seqs) >= 27  # created, started, 25 step events, completed
    assert followed > SSE_MAX_SECONDS  # it outlived at least one stream


SLOW_RATE = 5  # the rate-limit test's own two web processes: quota 10 per 2 s


def test_rate_limit_is_shared_by_web_processes_and_other_keys_are_unaffected(webs):
    # Given two more web processes with a low limit: quota 2 x SLOW_RATE = 10 per 2 s
    # (low, so that even a loaded machine sends faster than it)
    ports = []
    procs = []
    try:
        for _ in range(2):
            procs.append(webs.stack.start("web", {"OUTLAST_RATE_LIMIT_PER_SECOND": str(SLOW_RATE)}))
            webs.stack.wait_ready()
            ports.append(procs[-1].port)
        _burst_is_limited_across_processes(webs, ports)
    finally:
        for proc in procs:
            webs.stack.stop(proc)


def _burst_is_limited_across_processes(webs: Webs, ports: list[int]) -> None:
    key = webs.keys["burst"]
    quota = 2 * SLOW_RATE
    # When one key sends 3 x quota requests, alternating the two web processes
    statuses: list[int] = []
    limited = None
    t0 = time.monotonic()
    with requests.Session() as session:
        for i in range(3 * quota):
            port = ports[i % 2]
            response = session.get(webs.url(port) + "/v1/tasks", headers=headers(key), timeout=10)
            statuses.append(response.status_code)
            assert response.headers["RateLimit-Policy"] == f'"per-key";q={quota};w=2'
            assert response.headers["RateLimit"].startswith('"per-key";r=')
            if response.status_code == 429 and limited is None:
                limited = response
    elapsed = time.monotonic() - t0
    # Then no more than the quota was served in all (both processes count in Redis),
    # and the rest got 429 rate_limited with Retry-After and RateLimit r=0
    if elapsed < 2.0:
        assert statuses.count(200) == quota, statuses
    assert statuses.count(200) <= quota + SLOW_RATE * elapsed, (elapsed, statuses)
    assert limited is not None, (elapsed, statuses)
    assert limited.json()["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert ";r=0;" in limited.headers["RateLimit"]
    # And another key is unaffected at that very moment
    response = requests.get(
        webs.url(ports[0]) + "/v1/tasks", headers=headers(webs.keys["bystander"]), timeout=10
    )
    assert response.status_code == 200
    assert response.headers["RateLimit"] == f'"per-key";r={quota - 1};t=2'
    # And the Python client waits out the 429s instead of failing
    with Client(webs.url(ports[1]), key, timeout=10) as client:
        for _ in range(quota + 5):
            client.list(limit=1)
