"""Guarantee: with every worker down, tasks wait and then continue.

RUNTIME.md: "every worker down for an hour: tasks wait in ``pending``/``working`` and
continue when workers return; nothing is lost". An hour is compressed into many lease
and reaper intervals: beat keeps scheduling its sweeps the whole time.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Client, new_tenant

pytestmark = pytest.mark.faults

WAIT_SECONDS = 8.0  # > lease (3 s) + several reaper intervals (1 s)


def test_tasks_wait_in_pending_without_workers_and_complete_when_one_starts(
    stack, procs, ledger, watcher, database_url
):
    # Given web and beat but no worker at all
    tenant = new_tenant(database_url)
    procs.start("web", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)

    # When tasks are submitted and time passes
    tasks = [
        api.create("calls", {"url": ledger.url + "/calls", "calls": 2})["id"] for _ in range(3)
    ]
    tasks.append(api.create("echo", {"message": "waiting", "steps": 2})["id"])
    for task_id in tasks:
        watcher.track(task_id)
    deadline = time.monotonic() + WAIT_SECONDS

    # Then they stay pending, untouched, the whole time
    while time.monotonic() < deadline:
        seen = [api.get(t) for t in tasks]
        assert {t["status"] for t in seen} == {"pending"}, seen
        assert {t["attempt"] for t in seen} == {1}
        time.sleep(0.5)
    assert ledger.snapshot("/calls") == []

    # When a worker starts
    procs.start("worker")

    # Then every task completes, each call made once, no attempt counted as lost
    done = api.wait_all_terminal(tasks, timeout=60)
    assert {d["status"] for d in done.values()} == {"completed"}, done
    assert {d["attempt"] for d in done.values()} == {1}
    for task_id in tasks[:3]:
        counts = ledger.counts("/calls", task_id)
        assert len(counts) == 2 and set(counts.values()) == {1}, counts
    assert done[tasks[3]]["result"] == {"message": "waiting", "steps": 2}
