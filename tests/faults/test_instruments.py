"""The fault tests' instruments can fail: the watcher flags regressions and the ledger
counts, holds and fails requests as the tests rely on."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import sqlalchemy as sa

from tests.faults.conftest import new_tenant
from tests.faults.watcher import Snapshot, StatusWatcher, violations_between
from tests.harness import wait_until

pytestmark = pytest.mark.faults


def snap(status: str, step: int = 0, attempt: int = 1, result=None, error=None, fin=None):
    return Snapshot(status, step, attempt, result, error, fin)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (snap("working"), snap("pending")),
        (snap("completed", result={"a": 1}, fin="t"), snap("working")),
        (snap("cancelled", fin="t"), snap("completed", result={}, fin="t")),
        (snap("completed", result={"a": 1}, fin="t"), snap("completed", result={"a": 2}, fin="t")),
        (
            snap("failed", 2, error={"type": "x"}, fin="t"),
            snap("failed", 3, error={"type": "x"}, fin="t"),
        ),
        (snap("working", step=3), snap("working", step=2)),
        (snap("working", attempt=2), snap("working", attempt=1)),
    ],
)
def test_watcher_flags_every_kind_of_regression(before, after):
    assert violations_between(before, after)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (snap("pending"), snap("completed", result={})),  # polling skipped working
        (snap("input_required"), snap("pending")),  # POST /input may answer pending
        (snap("working", 1), snap("working", 2, attempt=2)),
        (snap("cancelled", 1, fin="t"), snap("cancelled", 1, fin="t")),
    ],
)
def test_watcher_accepts_moves_of_the_state_machine(before, after):
    assert violations_between(before, after) == []


def test_watcher_sees_a_regression_written_to_the_database(database_url, watcher):
    # Given a task row, watched by a second watcher
    tenant = new_tenant(database_url)
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO tasks (id, tenant_id, agent) VALUES ('tsk_w', :t, 'echo')"),
            {"t": tenant.tenant_id},
        )
    probe = StatusWatcher(interval=0.02).start(database_url)
    try:
        # When it completes and then (behind the lifecycle's back) runs again
        for sql in (
            "UPDATE tasks SET status = 'working' WHERE id = 'tsk_w'",
            "UPDATE tasks SET status = 'completed', result = '{}' WHERE id = 'tsk_w'",
            "UPDATE tasks SET status = 'working', result = NULL WHERE id = 'tsk_w'",
        ):
            with engine.begin() as conn:
                conn.execute(sa.text(sql))
            time.sleep(0.3)
        # Then the watcher reports it
        wait_until(lambda: probe.violations(), 5, what="a violation")
    finally:
        probe.stop()
        engine.dispose()
    assert any("terminal task changed status" in v for v in probe.violations())
    watcher.start(database_url)  # the fixture's watcher only sees the final state
    wait_until(lambda: watcher.db.polls > 0, 5)


def test_ledger_counts_keys_holds_calls_and_fails_on_request(ledger, watcher, database_url):
    watcher.start(database_url)
    ledger.hold_call(step=1, seconds=30, times=1)
    ledger.fail_first_per_key("/hooks", failures=2, status=503)

    def call(step: int, key: str) -> int:
        body = {"task_id": "tsk_x", "step": step, "key": key}
        return requests.post(
            ledger.url + "/calls", json=body, headers={"Idempotency-Key": key}, timeout=40
        ).status_code

    assert call(0, "k0") == 200
    held = threading.Thread(target=call, args=(1, "k1"))
    held.start()
    in_flight = ledger.wait_in_flight("tsk_x", step=1, timeout=5)
    assert in_flight.key == "k1" and ledger.in_flight() == [in_flight]
    assert call(1, "k1") == 200  # the hold was for one request only
    statuses = [
        requests.post(ledger.url + "/hooks", json={}, headers={"webhook-id": "evt_1"}).status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 200]
    assert ledger.counts("/calls", "tsk_x") == {"k0": 1, "k1": 2}
    assert ledger.call_keys_by_step("tsk_x") == {0: {"k0"}, 1: {"k1"}}
    ledger.close()  # releases the held request
    held.join(5)
    assert not held.is_alive()
