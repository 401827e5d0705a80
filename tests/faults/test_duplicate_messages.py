"""Guarantee: the same step message delivered twice executes once.

RUNTIME.md: "one execution commits; the other sees the lease or a newer checkpoint and
drops its work (fencing on (task, step, lease token))". The duplicates here are real
Celery messages published by hand on the ``steps`` queue, exactly what a broker
redelivery or a racing reaper produces.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import Client, celery_client, new_tenant, query, queue_outstanding
from tests.harness import wait_until

pytestmark = pytest.mark.faults


def test_duplicate_step_messages_execute_each_step_once(
    stack, procs, ledger, watcher, database_url, redis_url
):
    # Given a calls task submitted while no worker runs, and a duplicate of its first
    # step message, so that the two pool processes of the worker race for step 0
    tenant = new_tenant(database_url)
    procs.start("web", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    calls = 4
    ledger.hold_call(step=1, seconds=2.0, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": calls})
    watcher.track(task["id"])
    injector = celery_client(redis_url)

    def inject(step: int, copies: int = 1) -> None:
        for _ in range(copies):
            injector.send_task("outlast.run_step", args=[task["id"], step], queue="steps")

    inject(0)
    procs.start("worker")

    # When step 1 is running, its message and the next step's are published twice more
    ledger.wait_in_flight(task["id"], step=1)
    inject(1, copies=2)
    inject(2, copies=2)
    done = api.wait_terminal(task["id"], timeout=60)
    # and once it finished, every one of its steps (and one past the end) once more
    for step in range(calls + 1):
        inject(step)
    wait_until(lambda: queue_outstanding(redis_url, "steps") == 0, 30, what="duplicates consumed")

    # Then each step ran once: one call per key, one checkpoint and one event per step
    assert done["status"] == "completed", done
    assert done["attempt"] == 1
    counts = ledger.counts("/calls", task["id"])
    assert len(counts) == calls and set(counts.values()) == {1}, counts
    checkpoints = query(
        database_url, "SELECT step_index FROM checkpoints WHERE task_id = :t", t=task["id"]
    )
    assert sorted(r["step_index"] for r in checkpoints) == list(range(calls))
    types = [e["type"] for e in api.events(task["id"])]
    assert types.count("task.step.completed") == calls
    assert types.count("task.started") == 1
    assert types.count("task.completed") == 1 and types[-1] == "task.completed"
    assert api.get(task["id"]) == done
