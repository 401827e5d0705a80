"""Guarantee (V2.md 8 and 12): a database outage costs a task no ``attempt``, also when
PostgreSQL is down for longer than a lease (found by the chaos run, bench/chaos.py).

While PostgreSQL is down no worker can renew its leases, so they all run out. When it
is back, each interrupted step's retry takes its lease over (runner.OutageDuringStep)
within a quarter of a lease, but the reaper's first sweep used to get there first and
count every one of those live workers as lost (``attempt`` 2, ``task.retrying``, the
step's tool call made again). The reaper now leaves leases alone for one lease period
after the server started.

The PostgreSQL is this test's own, stopped for real; the workers are never touched.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Client, new_tenant, query
from tests.harness import wait_until

pytestmark = pytest.mark.faults

TASKS = 4
# A lease long against the reaper interval (0.5 s): an interrupted step's retry comes
# back within a quarter of the lease (2 s) and its renewals every third (2.7 s), so
# without the grace the reaper's first sweep after the restart gets to most tasks first.
LEASE = 8.0
DOWN = LEASE + 2  # every lease runs out meanwhile


def test_a_database_restart_longer_than_the_lease_costs_running_tasks_no_attempt(
    private_postgres, stack, procs, watcher
):
    # Given four echo tasks mid-step on a PostgreSQL of this test's own, with a reaper
    # sweeping four times as often as the step retries come back
    url = private_postgres.url
    stack.env.update(
        {
            "DATABASE_URL": url,
            "OUTLAST_LEASE_SECONDS": str(LEASE),
            "OUTLAST_REAPER_INTERVAL_SECONDS": "0.5",
            "OUTLAST_WORKER_CONCURRENCY": str(TASKS),
        }
    )
    tenant = new_tenant(url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(url, stack.base_url, tenant.api_key)
    ids = [
        api.create("echo", {"message": f"restart {i}", "steps": 4, "step_seconds": 2})["id"]
        for i in range(TASKS)
    ]
    for task_id in ids:
        watcher.track(task_id)

    def all_leased() -> bool:
        rows = query(
            url,
            "SELECT count(*) AS n FROM tasks WHERE id = ANY(:ids) AND step >= 1 "
            "AND lease_token IS NOT NULL",
            ids=ids,
        )
        return rows[0]["n"] == TASKS

    wait_until(all_leased, 60, 0.1, what="every task in the middle of step 1 or later")

    # When PostgreSQL is down for longer than the lease and starts again
    private_postgres.stop()
    time.sleep(DOWN)
    private_postgres.start()

    # Then every task completes on its first attempt: no live worker was counted lost
    for task_id in ids:
        done = api.wait_terminal(task_id, timeout=120)
        assert done["status"] == "completed", done
    rows = query(
        url,
        "SELECT t.id, t.attempt, (SELECT count(*) FROM events e WHERE e.task_id = t.id "
        "AND e.type = 'task.retrying') AS retried FROM tasks t WHERE t.id = ANY(:ids)",
        ids=ids,
    )
    assert [(r["attempt"], r["retried"]) for r in rows] == [(1, 0)] * TASKS, rows
    assert worker.alive() and "pool exited" not in worker.log_text(), procs.logs()
