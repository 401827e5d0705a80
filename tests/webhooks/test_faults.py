"""Deliveries survive crashes: the Procfile's worker and beat as real processes, killed
with SIGKILL between attempts and in the middle of a send."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.harness import wait_until
from tests.webhooks.helpers import attempts, deliveries, finish_task, verify_with_reference
from tests.webhooks.receiver import Answer, fail_first_per_id

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _start(stack, *names):
    procs = {name: stack.start(name) for name in names}
    if "worker" in procs:
        stack.wait_worker_ready(procs["worker"], 60)
    return procs


def _all(task_ids, status):
    rows = [r for t in task_ids for r in deliveries(t)]
    return rows if len(rows) == len(task_ids) and all(r["status"] == status for r in rows) else None


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_RETRY_BASE_SECONDS="4")
def test_killing_beat_and_worker_between_attempts_loses_no_delivery(
    stack, settings, tenant, make_receiver
):
    receiver = make_receiver()
    receiver.respond = fail_first_per_id(receiver)
    procs = _start(stack, "worker", "beat")
    task_ids = [
        finish_task(tenant.tenant_id, receiver.url, how)
        for how in ("completed", "failed", "cancelled", "input_required", "completed")
    ]

    # Given every first attempt failed and a retry is scheduled 2-4 s later ...
    def first_attempts_recorded():
        rows = [r for t in task_ids for r in deliveries(t)]
        return len(rows) == 5 and all(r["last_status_code"] == 500 for r in rows)

    wait_until(first_attempts_recorded, 30, what="five failed first attempts")
    # ... when beat and the worker die before any retry is due,
    stack.kill(procs["beat"])
    stack.kill(procs["worker"])
    assert receiver.count() == 5
    due = max(r["next_attempt_at"] for t in task_ids for r in deliveries(t))
    time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + 1.0)
    assert receiver.count() == 5  # nobody is left to send
    assert all(r["status"] == "pending" for t in task_ids for r in deliveries(t))

    # then fresh processes (and a second beat, by mistake) deliver each exactly once more.
    _start(stack, "worker", "beat", "beat")
    rows = wait_until(lambda: _all(task_ids, "delivered"), 60, what="all delivered")
    time.sleep(1.5)  # several sweeps of two beats later, still no extra sends
    assert receiver.count() == 10
    assert all(r["attempts"] == 2 for r in rows)
    by_id: dict[str, list] = {}
    for request in receiver.requests:
        by_id.setdefault(request.headers["webhook-id"], []).append(request)
        verify_with_reference(tenant.webhook_secret, request)
    assert set(by_id) == {r["event_id"] for r in rows}
    assert all(len(sent) == 2 for sent in by_id.values())
    for row in rows:
        assert [a["status_code"] for a in attempts(row["id"])] == [500, 200]


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_TIMEOUT_SECONDS="1")
def test_worker_killed_mid_send_is_retried_when_its_lease_ends(
    stack, settings, tenant, make_receiver
):
    from app.webhooks import send_lease_seconds

    # The first request is held open: the worker sending it dies meanwhile.
    receiver = make_receiver(lambda n: Answer(200, delay=3 if n == 0 else 0))
    procs = _start(stack, "worker", "beat")
    task_id = finish_task(tenant.tenant_id, receiver.url)
    wait_until(lambda: receiver.count() == 1, 30, what="first request arrives")
    stack.kill(procs["worker"])
    killed_at = time.time()
    _start(stack, "worker")

    (row,) = wait_until(lambda: _all([task_id], "delivered"), 60, what="delivered")
    assert row["attempts"] == 2
    first, second = attempts(row["id"])
    assert first["status_code"] is None
    assert first["error"] == "no outcome recorded: the sender was lost"
    assert second["status_code"] == 200
    assert [r.headers["webhook-id"] for r in receiver.requests] == [row["event_id"]] * 2
    # Not re-sent before the lease (2 x timeout + 5 s) of the lost sender ran out.
    lease = send_lease_seconds(settings)
    assert receiver.requests[1].at - receiver.requests[0].at >= lease - 0.5
    assert receiver.requests[1].at > killed_at
    for request in receiver.requests:
        verify_with_reference(tenant.webhook_secret, request)
