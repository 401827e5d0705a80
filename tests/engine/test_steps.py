"""The step engine with a real in-process worker: checkpoints, duplicates, failures,
cancellation, deadlines and step retries."""

from __future__ import annotations

import threading
import time

from app import settings as settings_mod
from app.engine import sweeps
from app.store import db, lifecycle, outbox
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until


def test_hundred_step_echo_completes_with_hundred_checkpoints(celery_worker, tasks):
    task_id = tasks.submit("echo", {"message": "hi", "steps": 100})

    task = tasks.wait_status(task_id, "completed", timeout=90)

    assert task["result"] == {"message": "hi", "steps": 100}
    assert task["step"] == 100
    assert task["progress"]["current"] == 100 and task["progress"]["total"] == 100
    indexes = [
        r["step_index"]
        for r in tasks.rows(
            "SELECT step_index FROM checkpoints WHERE task_id = :id ORDER BY step_index", id=task_id
        )
    ]
    assert indexes == list(range(100))
    types = tasks.event_types(task_id)
    assert types[:2] == ["task.created", "task.started"]
    assert types.count("task.step.completed") == 100
    assert types.count("task.progress") == 100
    assert types[-1] == "task.completed"


def test_redelivered_step_messages_do_not_run_a_step_twice(celery_worker, tasks, ledger):
    # Given a calls task whose first step message is delivered three times at once
    task_id = tasks.submit("calls", {"url": ledger.url, "calls": 3, "step_seconds": 0.3})
    with db.transaction() as conn:
        outbox.add_step(conn, task_id, 0)
        outbox.add_step(conn, task_id, 0)

    task = tasks.wait_status(task_id, "completed")

    # Then each step made its call exactly once
    assert task["result"] == {"calls": 3, "statuses": [200, 200, 200]}
    assert ledger.count() == 3
    assert set(ledger.keys().values()) == {1}
    assert [r.json["step"] for r in ledger.requests] == [0, 1, 2]
    assert tasks.event_types(task_id).count("task.started") == 1

    # When stale messages for past steps arrive after the task finished
    events_before = tasks.event_types(task_id)
    with db.transaction() as conn:
        outbox.add_step(conn, task_id, 1)
        outbox.add_step(conn, task_id, 3)
    wait_until(lambda: tasks.scalar("SELECT count(*) FROM outbox") == 0, 10, what="published")
    time.sleep(1.0)

    # Then nothing runs again
    assert ledger.count() == 3
    assert tasks.event_types(task_id) == events_before


def test_echo_fails_at_its_one_based_fail_at_step(celery_worker, tasks):
    task_id = tasks.submit("echo", {"message": "x", "steps": 3, "fail_at_step": 2})

    task = tasks.wait_status(task_id, "failed")

    assert task["error"]["type"] == "agent_error"
    assert "step 2" in task["error"]["message"]
    assert task["step"] == 1  # the first step was checkpointed, the second failed


def test_result_that_is_not_json_fails_with_invalid_output(celery_worker, tasks):
    task_id = tasks.submit("test_bad_output", {})

    task = tasks.wait_status(task_id, "failed")

    assert task["error"]["type"] == "invalid_output"
    assert task["step"] == 0


def test_cancel_mid_run_stops_further_tool_calls(celery_worker, tasks, tenant, ledger):
    task_id = tasks.submit("calls", {"url": ledger.url, "calls": 50, "step_seconds": 0.1})
    wait_until(lambda: ledger.count() >= 3, 20, what="three calls")

    with db.transaction() as conn:
        cancelled = lifecycle.cancel(conn, task_id, tenant.tenant_id)
    assert cancelled is not None and cancelled["status"] == "cancelled"
    time.sleep(1.5)

    task = tasks.get(task_id)
    assert task["status"] == "cancelled"
    started_after_cancel = tasks.scalar(
        "SELECT count(*) FROM tool_calls WHERE task_id = :id AND started_at > :at",
        id=task_id,
        at=cancelled["finished_at"],
    )
    assert started_after_cancel == 0
    logged = tasks.scalar("SELECT count(*) FROM tool_calls WHERE task_id = :id", id=task_id)
    assert ledger.count() == logged < 50
    checkpoints_after = tasks.scalar(
        "SELECT count(*) FROM checkpoints WHERE task_id = :id AND finished_at > :at",
        id=task_id,
        at=cancelled["finished_at"],
    )
    assert checkpoints_after == 0


def test_cancel_during_a_long_tool_call_discards_its_late_output(celery_worker, tasks, tenant):
    arrived = threading.Event()

    def slow_then_ok(request):
        arrived.set()
        time.sleep(1.5)
        return json_answer(200, {"ok": True})

    callee = LocalServer(slow_then_ok)
    try:
        task_id = tasks.submit("calls", {"url": callee.url, "calls": 3})
        assert arrived.wait(20)
        with db.transaction() as conn:
            lifecycle.cancel(conn, task_id, tenant.tenant_id)
        time.sleep(2.5)
    finally:
        callee.close()

    task = tasks.get(task_id)
    assert task["status"] == "cancelled"
    assert task["step"] == 0
    assert tasks.scalar("SELECT count(*) FROM checkpoints WHERE task_id = :id", id=task_id) == 0
    assert callee.count() == 1
    # The call did happen, so the log says so (a re-run would replay, not repeat it).
    assert tasks.scalar("SELECT status FROM tool_calls WHERE task_id = :id", id=task_id) == (
        "completed"
    )


def test_deadline_fails_a_running_task_with_timeout(celery_worker, tasks):
    task_id = tasks.submit(
        "echo", {"message": "slow", "steps": 1, "step_seconds": 30}, timeout_seconds=2
    )

    task = tasks.wait_status(task_id, "failed", timeout=8)

    assert task["error"]["type"] == "timeout"
    assert task["step"] == 0
    assert tasks.scalar("SELECT count(*) FROM checkpoints WHERE task_id = :id", id=task_id) == 0


def test_deadline_sweep_fails_a_task_waiting_for_input(celery_worker, tasks):
    task_id = tasks.submit("approval", {"question": "ok?"}, timeout_seconds=1)
    tasks.wait_status(task_id, "input_required")
    time.sleep(1.1)

    assert sweeps.expire_task_deadlines() == 1

    task = tasks.get(task_id)
    assert task["status"] == "failed" and task["error"]["type"] == "timeout"
    assert sweeps.expire_task_deadlines() == 0


def test_tool_5xx_is_retried_inside_the_step_with_the_same_key(celery_worker, tasks):
    answers = iter([503, 502])

    callee = LocalServer(lambda r: json_answer(next(answers, 200), {}))
    try:
        task_id = tasks.submit("calls", {"url": callee.url})
        task = tasks.wait_status(task_id, "completed")
    finally:
        callee.close()

    assert task["result"] == {"calls": 1, "statuses": [200]}
    assert callee.count() == 3
    assert list(callee.keys().values()) == [3]  # one key, three requests
    assert "task.retrying" not in tasks.event_types(task_id)


def test_transient_step_errors_retry_with_backoff_then_fail(celery_worker, tasks, settings):
    settings_mod.configure(settings.replace(step_retries=1))
    callee = LocalServer(lambda r: json_answer(503, {}))
    try:
        task_id = tasks.submit("calls", {"url": callee.url})

        def failed_after_waking_due_timers():
            sweeps.wake_due_timers()  # what the beat's wake_timers sweep does each second
            return tasks.get(task_id)["status"] == "failed"

        wait_until(failed_after_waking_due_timers, 30, interval=0.2, what="failed")
    finally:
        callee.close()

    task = tasks.get(task_id)
    assert task["error"]["type"] == "agent_error"
    assert "503" in task["error"]["message"]
    assert tasks.event_types(task_id).count("task.retrying") == 1
    assert callee.count() == 8  # two runs of the step, four tries each
    assert len(callee.keys()) == 1  # all with the call's one key


def test_a_step_longer_than_its_lease_keeps_it_by_renewal(celery_worker, tasks, settings):
    assert settings.lease_seconds == 3
    task_id = tasks.submit("echo", {"message": "long", "steps": 1, "step_seconds": 4.5})
    reaped: list[int] = []
    finished = threading.Event()

    def reaper() -> None:  # the beat's reaper, run far more often than the lease
        while not finished.wait(0.3):
            reaped.append(sweeps.reap_expired_leases())

    thread = threading.Thread(target=reaper)
    thread.start()
    try:
        task = tasks.wait_status(task_id, "completed", timeout=30)
    finally:
        finished.set()
        thread.join()

    assert task["attempt"] == 1
    assert sum(reaped) == 0 and len(reaped) > 10
    assert "task.retrying" not in tasks.event_types(task_id)
