"""The per-process lease renewer (app/engine/lease.py): one thread in each worker pool
process renews every lease that process holds, instead of a thread per step.

- It keeps renewing: steps longer than the lease (3 s here), one after another in the
  same process, finish under their first attempt; nothing is reaped.
- When a process's renewals stop (the whole worker paused with SIGSTOP mid-step), its
  lease expires, the reaper gives the task to the other worker (attempt 2), and when
  the paused process resumes, its renewer finds the lease gone and its step's late
  checkpoint is fenced off: one checkpoint per step, the newer execution's.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import Client, new_tenant, query
from tests.harness import wait_until

pytestmark = pytest.mark.faults

LEASE_SECONDS = 3.0  # tests/conftest.py's OUTLAST_LEASE_SECONDS


def test_steps_longer_than_the_lease_are_renewed_by_the_process_renewer_and_never_reaped(
    stack, procs, watcher, database_url
):
    # Given one worker and an echo task of three steps, each longer than the lease
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    task = api.create("echo", {"message": "long", "steps": 3, "step_seconds": 4.0})
    watcher.track(task["id"])

    # When a step has run for more than a lease, its lease was renewed meanwhile
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 AS ok FROM tasks WHERE id = :t AND lease_token IS NOT NULL "
            "AND lease_expires_at > started_at + make_interval(secs => :lease)",
            t=task["id"],
            lease=LEASE_SECONDS + 1,
        ),
        20,
        what="a renewed lease",
    )

    # Then every step finishes under the first attempt: no lease ever expired
    done = api.wait_terminal(task["id"], timeout=60)
    assert done["status"] == "completed" and done["attempt"] == 1, done
    types = [e["type"] for e in api.events(task["id"])]
    assert "task.retrying" not in types, types
    assert types.count("task.step.completed") == 3, types
    assert types.count("task.progress") == 3, types


def test_a_worker_whose_renewals_stop_loses_the_lease_and_its_late_checkpoint_is_discarded(
    stack, procs, ledger, watcher, database_url
):
    # Given two workers and a one-call task whose call is held open for a while
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.hold_call(step=0, seconds=6.0, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 1})
    watcher.track(task["id"])
    first = ledger.wait_in_flight(task["id"], step=0)
    (leased,) = query(database_url, "SELECT lease_token FROM tasks WHERE id = :t", t=task["id"])

    # When the worker running the step stops renewing (its processes paused) past the lease
    zombie = procs.holder_of(first)
    zombie.signal_group(signal.SIGSTOP)
    try:
        # Then the reaper gives the step to the other worker, which completes the task
        done = api.wait_terminal(task["id"], timeout=60)
        assert done["status"] == "completed" and done["attempt"] == 2, done
        wait_until(lambda: first.answered is not None, 20, what="the paused call answered")
    finally:
        # When the paused worker resumes: its renewer and its step find the lease gone
        zombie.signal_group(signal.SIGCONT)
    wait_until(lambda: "'discarded'" in zombie.log_text(), 30, what="the zombie's step discarded")
    time.sleep(1.0)

    # Then the zombie's checkpoint never landed: one checkpoint and one step event, the
    # newer execution's, and the task is as the other worker left it
    rows = query(
        database_url,
        "SELECT step_index, attempt FROM checkpoints WHERE task_id = :t ORDER BY step_index",
        t=task["id"],
    )
    assert [(r["step_index"], r["attempt"]) for r in rows] == [(0, 2)], rows
    types = [e["type"] for e in api.events(task["id"])]
    assert types.count("task.step.completed") == 1, types
    assert types[-1] == "task.completed", types
    after = api.get(task["id"])
    assert after["status"] == "completed" and after["result"] == done["result"], after
    (row,) = query(database_url, "SELECT lease_token FROM tasks WHERE id = :t", t=task["id"])
    assert row["lease_token"] is None and leased["lease_token"] is not None
