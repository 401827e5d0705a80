"""Deliveries survive crashes: the Procfile's worker and beat as real processes, killed
with SIGKILL between attempts and in the middle of a send.

One scenario covers both (each worker start costs many seconds on a shared machine).
"""

from __future__ import annotations

import time

import pytest

from app.webhooks.sender import send_lease_seconds
from tests.harness import wait_until
from tests.webhooks.helpers import attempts, deliveries, finish_task, verify_with_reference
from tests.webhooks.receiver import Answer, fail_first_per_id

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _rows(task_ids):
    return [r for t in task_ids for r in deliveries(t)]


# Retries 4-8 s after a failure and a 3 s timeout (an 11 s send lease): time to kill
# the processes before any retry is due and while one send still waits for its answer.
@pytest.mark.webhook_env(
    OUTLAST_WEBHOOK_RETRY_BASE_SECONDS="8", OUTLAST_WEBHOOK_TIMEOUT_SECONDS="3"
)
def test_killing_beat_and_worker_between_attempts_and_mid_send_loses_no_delivery(
    stack, settings, tenant, make_receiver, only_own_beats
):
    flaky = make_receiver()
    flaky.respond = fail_first_per_id(flaky)
    held = make_receiver(lambda n: Answer(200, delay=10 if n == 0 else 0))
    beat = stack.start("beat")
    worker = stack.start("worker")
    stack.wait_worker_ready(worker, 90)

    # Given five deliveries whose first attempt failed (a retry is scheduled), and one
    # whose first attempt is still waiting for its receiver's answer,
    flaky_tasks = [
        finish_task(tenant.tenant_id, flaky.url, how)
        for how in ("completed", "failed", "cancelled", "input_required", "completed")
    ]
    held_task = finish_task(tenant.tenant_id, held.url)
    all_tasks = [*flaky_tasks, held_task]
    wait_until(
        lambda: (
            held.count() == 1
            and len(_rows(flaky_tasks)) == 5
            and all(r["last_status_code"] == 500 for r in _rows(flaky_tasks))
        ),
        30,
        interval=0.05,
        what="five failed first attempts and one request in flight",
    )

    # when beat and the worker are killed (and a new worker starts, without beat),
    stack.kill(beat)
    stack.kill(worker)
    killed_at = time.time()
    assert flaky.count() == 5, "a retry was sent before the kill: the test lost its race"
    worker = stack.start("worker")
    stack.wait_worker_ready(worker, 90)
    wait_until(
        lambda: time.time() > killed_at + send_lease_seconds(settings) + 0.5, 30, what="lease"
    )
    # every retry is overdue and the lost send's lease is over, but nothing schedules them,
    assert flaky.count() == 5 and held.count() == 1
    assert all(r["status"] == "pending" for r in _rows(all_tasks))

    # then beat (twice, by mistake) brings each delivery exactly one more attempt.
    stack.start("beat")
    stack.start("beat")
    rows = wait_until(
        lambda: (
            (rows := _rows(all_tasks)) and all(r["status"] == "delivered" for r in rows) and rows
        ),
        60,
        what="all delivered",
    )
    time.sleep(1.5)  # several sweeps of two beats later, still nothing extra
    assert flaky.count() == 10 and held.count() == 2
    assert all(r["attempts"] == 2 for r in rows)

    by_id: dict[str, list] = {}
    for request in flaky.requests + held.requests:
        by_id.setdefault(request.headers["webhook-id"], []).append(request)
        verify_with_reference(tenant.webhook_secret, request)
    assert set(by_id) == {r["event_id"] for r in rows}
    assert all(len(sent) == 2 for sent in by_id.values())
    for row in rows[:-1]:
        assert [a["status_code"] for a in attempts(row["id"])] == [500, 200]

    # The attempt lost mid-send is recorded as such.
    first, second = attempts(rows[-1]["id"])
    assert first["status_code"] is None
    assert first["error"] == "no outcome recorded: the sender was lost"
    assert second["status_code"] == 200
