"""Guarantee: a submission is accepted while the broker is down.

RUNTIME.md: "broker down at submission: ``202``; the transactional outbox publishes
when the broker returns". The Redis here is this test's own, stopped for real.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Client, new_tenant, query

pytestmark = pytest.mark.faults


def test_submission_while_redis_is_down_is_accepted_and_runs_when_it_returns(
    private_redis, stack, procs, ledger, watcher, database_url
):
    # Given the whole stack on a Redis of this test's own
    stack.env["REDIS_URL"] = private_redis.url
    tenant = new_tenant(database_url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)

    # When Redis stops and tasks are submitted
    private_redis.stop()
    accepted = []
    for i in range(3):
        started = time.monotonic()
        response = api.submit(
            "calls",
            {"url": ledger.url + "/calls", "calls": 2},
            idempotency_key=f"broker-down-{i}",
        )
        elapsed = time.monotonic() - started
        # Then each is accepted, promptly, and durably stored
        assert response.status_code == 202, (response.status_code, response.text)
        assert elapsed < 10, f"202 took {elapsed:.1f}s with the broker down"
        assert response.json()["status"] == "pending"
        accepted.append(response.json()["id"])
        watcher.track(response.json()["id"])
    stored = query(database_url, "SELECT id FROM tasks WHERE id = ANY(:ids)", ids=accepted)
    assert len(stored) == 3
    unsent = query(database_url, "SELECT count(*) AS n FROM outbox")
    assert unsent[0]["n"] >= 3, "the step messages should wait in the outbox"
    time.sleep(3)
    assert {api.get(t)["status"] for t in accepted} == {"pending"}
    assert ledger.snapshot("/calls") == []

    # When Redis comes back (empty: it keeps nothing on disk)
    private_redis.start()
    # A Celery 5.7 / kombu 5.7 worker sometimes exits on losing Redis ("Unrecoverable
    # error: AttributeError: 'NoneType' object has no attribute 'hostname'"; see
    # docs/reliability.md). A platform restarts a crashed process; so does this test.
    time.sleep(1)
    if not worker.alive():
        print("NOTE: the worker exited during the broker outage; restarting it")
        procs.spawn("worker")
    assert web.alive() and beat.alive(), procs.logs()

    # Then the outbox relay publishes and every task completes, each call made once
    done = api.wait_all_terminal(accepted, timeout=90)
    assert {d["status"] for d in done.values()} == {"completed"}, done
    for task_id in accepted:
        counts = ledger.counts("/calls", task_id)
        assert len(counts) == 2 and set(counts.values()) == {1}, counts
    # and a client retrying a submission it lost gets the same task
    again = api.submit(
        "calls", {"url": ledger.url + "/calls", "calls": 2}, idempotency_key="broker-down-0"
    )
    assert again.status_code == 202 and again.json()["id"] == accepted[0]
    assert query(database_url, "SELECT count(*) AS n FROM outbox")[0]["n"] == 0
