"""Guarantee: a database outage loses and duplicates nothing.

RUNTIME.md: "database down: API answers ``503`` + ``Retry-After``; workers back off and
retry; no task is lost or duplicated". The PostgreSQL here is this test's own, stopped
for real (fast shutdown: open connections are cut) while steps are running.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.faults.conftest import Client, new_tenant, query
from tests.harness import wait_until

pytestmark = pytest.mark.faults

OUTAGE_SECONDS = 6.0
CALLS = 4


def assert_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) >= 1


def test_database_outage_answers_503_and_every_task_completes_once_it_returns(
    private_postgres, stack, procs, ledger, watcher
):
    # Given the whole stack on a PostgreSQL of this test's own, with tasks mid-way
    url = private_postgres.url
    stack.env["DATABASE_URL"] = url
    tenant = new_tenant(url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(url, stack.base_url, tenant.api_key)
    task_input = {"url": ledger.url + "/calls", "calls": CALLS, "step_seconds": 0.5}
    running = [
        api.create("calls", task_input, idempotency_key=f"before-{i}")["id"] for i in range(4)
    ]
    for task_id in running:
        watcher.track(task_id)
    wait_until(lambda: all(api.get(t)["step"] >= 1 for t in running), 30, what="tasks mid-way")

    # When PostgreSQL stops
    private_postgres.stop()
    outage_started = time.monotonic()

    # Then submissions and reads answer 503 with Retry-After, never hang or 500
    refused_keys = []
    while time.monotonic() - outage_started < OUTAGE_SECONDS:
        key = f"during-{len(refused_keys)}"
        started = time.monotonic()
        assert_unavailable(api.submit("calls", task_input, idempotency_key=key, timeout=15))
        assert time.monotonic() - started < 10
        refused_keys.append(key)
        assert_unavailable(api.session.get(f"{stack.base_url}/v1/tasks/{running[0]}", timeout=15))
        time.sleep(0.5)
    # and every process rides it out
    assert web.alive() and worker.alive() and beat.alive(), procs.logs()

    # When PostgreSQL comes back and the client retries what was refused
    private_postgres.start()

    def retried(key: str) -> str | None:
        response = api.submit("calls", task_input, idempotency_key=key)
        return response.json()["id"] if response.status_code == 202 else None

    late = [wait_until(lambda k=k: retried(k), 30, 0.5, what=f"{k} accepted") for k in refused_keys]
    for task_id in late:
        watcher.track(task_id)

    # Then everything in flight and everything retried completes, without restarts
    done = api.wait_all_terminal(running + late, timeout=120)
    assert {d["status"] for d in done.values()} == {"completed"}, {
        t: (d["status"], d["error"]) for t, d in done.items()
    }
    assert worker.alive(), "the worker died instead of backing off"
    # No task lost or duplicated: one task per submission key
    rows = query(url, "SELECT idempotency_key FROM tasks ORDER BY idempotency_key")
    assert sorted(r["idempotency_key"] for r in rows) == sorted(
        [f"before-{i}" for i in range(4)] + refused_keys
    )
    # Every call reached the ledger; only a call cut by the outage may have come twice
    twice = 0
    for task_id in running + late:
        by_step = ledger.call_keys_by_step(task_id)
        assert sorted(by_step) == list(range(CALLS)), (task_id, by_step)
        assert all(len(keys) == 1 for keys in by_step.values()), by_step
        counts = ledger.counts("/calls", task_id)
        assert max(counts.values()) <= 2, counts
        twice += sum(1 for n in counts.values() if n == 2)
    assert twice <= 2, f"{twice} calls repeated; at most one per running step (concurrency 2)"
