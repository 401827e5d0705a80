"""Guarantee (issue 16, V2.md 6): a worker SIGKILLed while a parent waits for its
children loses no wake-up.

A ``fanout`` parent waits, holding no worker, for three ``calls`` children; the last
child's call is held open by the ledger. Two places to lose the worker:

- in the middle of the last child's step: the reaper resumes the child on the other
  worker, and the child's terminal transition wakes the parent;
- after the last child's terminal commit, before the parent is woken: the test holds
  the parent's row (as a concurrent cancel or input request would for a moment), so the
  child's transaction leaves the wake-up to a retry after its commit, which blocks on
  that row; the worker is SIGKILLed right there (with any worker whose sweep is also
  waiting on the row). Only the beat's ``wake_parents`` sweep, run by a worker started
  afterwards or the other one, can then wake the parent, and it does.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import sqlalchemy as sa

from tests.faults.conftest import Client, new_tenant, query
from tests.harness import wait_until

pytestmark = pytest.mark.faults

LEASE = 3.0  # conftest TEST_ENV
REAPER = 1.0


def start_fanout(api: Client, ledger, last_path: str) -> tuple[dict, list[str]]:
    """A fanout of three calls children, the last one calling ``last_path``."""
    inputs = [
        {"url": ledger.url + "/calls", "calls": 1},
        {"url": ledger.url + "/calls", "calls": 1},
        {"url": ledger.url + last_path, "calls": 1},
    ]
    parent = api.create("fanout", {"agent": "calls", "inputs": inputs})

    def three_children() -> list[str] | None:
        response = api.session.get(f"{api.base_url}/v1/tasks/{parent['id']}/children", timeout=5)
        kids = response.json()["data"] if response.status_code == 200 else []
        return [k["id"] for k in kids] if len(kids) == 3 else None

    ids = wait_until(three_children, 30, 0.1, what="three children spawned")
    return parent, ids  # type: ignore[return-value]


def parent_waits_with_two_children_done(database_url: str, parent_id: str) -> bool:
    rows = query(
        database_url,
        "SELECT (SELECT waiting_for IS NOT NULL AND lease_token IS NULL FROM tasks "
        "        WHERE id = :p) AS waiting, "
        "(SELECT count(*) FROM tasks WHERE parent_id = :p AND status = 'completed') AS done",
        p=parent_id,
    )
    return bool(rows[0]["waiting"]) and rows[0]["done"] == 2


def assert_fanout_completed(api: Client, parent_id: str, ids: list[str]) -> dict:
    done = api.wait_terminal(parent_id, timeout=60)
    assert done["status"] == "completed", done
    assert done["attempt"] == 1
    assert done["result"] == {
        "children": ids,
        "statuses": ["completed"] * 3,
        "results": [{"calls": 1, "statuses": [200]}] * 3,
    }
    assert api.events(parent_id)[-1]["type"] == "task.completed"
    return done


def test_worker_sigkilled_mid_step_of_the_last_child_loses_no_wake_up(
    stack, procs, ledger, watcher, database_url
):
    # Given web, beat, two workers and a fanout whose last child's call hangs
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.add_rule(lambda r: r.path.startswith("/calls-slow"), delay=60.0, times=1)
    parent, ids = start_fanout(api, ledger, "/calls-slow")
    for task_id in (parent["id"], *ids):
        watcher.track(task_id)
    held = ledger.wait_in_flight(ids[2], step=0)
    wait_until(
        lambda: parent_waits_with_two_children_done(database_url, parent["id"]),
        30,
        0.1,
        what="the parent waiting, two children done",
    )

    # When the worker running the last child is SIGKILLed in the middle of its call
    killed_at = procs.kill(procs.holder_of(held))
    procs.spawn("worker")  # a platform restarts it

    # Then the child resumes on the live worker (same key) and the parent is woken
    done = assert_fanout_completed(api, parent["id"], ids)
    print(f"FIGURE kill_to_parent_completed_seconds={time.monotonic() - killed_at:.2f}")
    last = api.get(ids[2])
    assert last["attempt"] == 2 and last["parent_id"] == parent["id"]
    calls = ledger.snapshot("/calls-slow", ids[2])
    assert len(calls) == 2 and calls[0].key == calls[1].key
    assert done["step"] == 2


def blocked_backend_ports(database_url: str) -> list[int]:
    rows = query(
        database_url,
        "SELECT client_port FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database() AND query LIKE '%waiting_for = NULL%'",
    )
    return [r["client_port"] for r in rows]


def process_group_of_port(procs, port: int):
    for conn in psutil.net_connections("tcp"):
        if conn.pid and conn.laddr and conn.laddr.port == port:
            group = os.getpgid(conn.pid)
            for proc in procs.stack.processes:
                if proc.alive() and proc.pid == group:
                    return proc
    raise AssertionError(f"no process of the test holds local port {port}")


def test_worker_sigkilled_after_the_last_childs_commit_before_the_wake_up_loses_none(
    stack, procs, ledger, watcher, database_url
):
    # Given web, beat, two workers and a fanout whose last child's call takes 4 s
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.add_rule(lambda r: r.path.startswith("/calls-slow"), delay=4.0, times=1)
    parent, ids = start_fanout(api, ledger, "/calls-slow")
    for task_id in (parent["id"], *ids):
        watcher.track(task_id)
    ledger.wait_in_flight(ids[2], step=0)
    wait_until(
        lambda: parent_waits_with_two_children_done(database_url, parent["id"]),
        30,
        0.1,
        what="the parent waiting, two children done",
    )

    # And the parent's row held by another transaction when the last child finishes
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    holder = engine.connect()
    held = holder.begin()
    try:
        holder.execute(
            sa.text("SELECT 1 FROM tasks WHERE id = :id FOR NO KEY UPDATE"), {"id": parent["id"]}
        )
        # the child commits its completion; its wake-up retry then waits for the row
        ports = wait_until(
            lambda: blocked_backend_ports(database_url), 30, 0.05, what="the wake-up blocked"
        )
        assert api.get(ids[2])["status"] == "completed"

        # When every worker with a wake-up pending on that row is SIGKILLed (the child's
        # retry, and any beat sweep that came meanwhile), and the row is let go
        time.sleep(1.5)
        victims = {process_group_of_port(procs, port).pid: port for port in ports}
        victims.update(
            {process_group_of_port(procs, p).pid: p for p in blocked_backend_ports(database_url)}
        )
        for proc in list(procs.stack.processes):
            if proc.pid in victims and proc.alive():
                procs.kill(proc)
        assert victims
        time.sleep(0.5)
    finally:
        held.rollback()
        holder.close()
        engine.dispose()
    released_at = time.monotonic()
    procs.spawn("worker")  # a platform restarts what was killed

    # Then the beat's sweep wakes the parent, which completes with every result
    assert_fanout_completed(api, parent["id"], ids)
    print(f"FIGURE lost_wake_up_to_parent_completed_seconds={time.monotonic() - released_at:.2f}")
    assert time.monotonic() - released_at < LEASE + 5 * REAPER + 5
    logs = "\n".join(p.log_text() for p in stack.processes)
    assert "woke 1 task whose children were done" in logs
    assert api.get(ids[2])["attempt"] == 1
