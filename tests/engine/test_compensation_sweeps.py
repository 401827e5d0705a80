"""The sweeps with a ``compensating`` task, against real PostgreSQL and Redis (no worker:
the tests look at the rows and messages a sweep leaves behind): the reaper resumes a
lost undo step, the lost-message sweep and the timer sweep send its message, and a
lost worker at the last attempt compensates before failing."""

from __future__ import annotations

from app.engine import sweeps
from app.store import db, ids, lifecycle, tool_calls
from tests.engine.test_sweeps import lose_step_messages, queued_steps


def owe_one_undo(tasks) -> tuple[str, str]:
    """A working ``calls`` task holding a lease, with one completed call to a tool that
    declares a compensation (what a step leaves in the log); returns (task, token)."""
    task_id = tasks.submit("calls", {"url": "http://127.0.0.1:9/", "compensate": True})
    token = ids.new_token()
    with db.transaction() as conn:
        assert lifecycle.acquire_lease(conn, task_id, 0, token, 30) is not None
        started = tool_calls.begin(
            conn,
            task_id=task_id,
            step=0,
            call_index=0,
            name="http_post",
            key="k0",
            args={"url": "http://127.0.0.1:9/", "json": {}},
            lease_token=token,
            compensate="calls_undo",
        )
        assert started is not None
        tool_calls.complete(conn, task_id, 0, 0, {"status": 200, "body": {}})
    return task_id, token


def compensating(tasks, redis_url: str) -> str:
    """A ``compensating`` task (cancelled with one undo owed) whose message was lost."""
    task_id, _ = owe_one_undo(tasks)
    with db.transaction() as conn:
        row = lifecycle.cancel(conn, task_id, tasks.tenant_id)
    assert row["status"] == "compensating"
    lose_step_messages(redis_url)
    return task_id


def test_a_lost_worker_at_the_last_attempt_compensates_then_fails_with_worker_lost(
    flask_app, tasks, settings, redis_url
):
    # Given a task at its last attempt with one undo owed, whose worker vanished
    task_id, _ = owe_one_undo(tasks)
    tasks.scalar(
        "UPDATE tasks SET attempt = :max, lease_expires_at = now() - interval '1 s' "
        "WHERE id = :id RETURNING 1",
        id=task_id,
        max=settings.max_attempts,
    )
    before = queued_steps(redis_url)

    # When the reaper runs
    sweeps.reap_expired_leases()

    # Then the task is compensating with the worker_lost error, its undo step queued
    task = tasks.get(task_id)
    assert task["status"] == "compensating"
    assert task["error"]["type"] == "worker_lost"
    assert task["compensation"] == {"reason": "failed", "total": 1, "done": 0, "failed": 0}
    assert task["lease_token"] is None
    assert tasks.event_types(task_id)[-1] == "task.compensating"
    assert queued_steps(redis_url) == before + 1


def test_the_reaper_resends_a_lost_undo_step_with_no_event(flask_app, tasks, redis_url):
    # Given a compensating task whose undo step's worker vanished holding the lease
    task_id = compensating(tasks, redis_url)
    with db.transaction() as conn:
        assert lifecycle.acquire_undo_lease(conn, task_id, 0, ids.new_token(), 0.01)
    tasks.scalar("SELECT pg_sleep(0.05)")
    events = tasks.event_types(task_id)

    # When the reaper runs
    assert sweeps.reap_expired_leases() == 1

    # Then the lease is cleared, attempt + 1, the step queued again, still compensating
    task = tasks.get(task_id)
    assert task["status"] == "compensating" and task["lease_token"] is None
    assert task["attempt"] == 2
    assert queued_steps(redis_url) == 1
    assert tasks.event_types(task_id) == events
    assert sweeps.reap_expired_leases() == 0


def test_the_lost_message_sweep_resends_a_compensating_tasks_step(flask_app, tasks, redis_url):
    # Given a compensating task whose step message Redis lost an hour ago
    task_id = compensating(tasks, redis_url)
    tasks.scalar(
        "UPDATE tasks SET dispatched_at = now() - interval '1 hour' WHERE id = :id RETURNING 1",
        id=task_id,
    )
    assert queued_steps(redis_url) == 0
    # Then the sweep sends it one message, and no second one
    assert sweeps.redispatch_lost_messages() == 1
    assert queued_steps(redis_url) == 1
    assert sweeps.redispatch_lost_messages() == 0


def test_the_timer_sweep_wakes_an_undo_waiting_for_its_backoff(flask_app, tasks, redis_url):
    # Given a compensating task whose undo failed and waits for its next try
    task_id = compensating(tasks, redis_url)
    token = ids.new_token()
    with db.transaction() as conn:
        assert lifecycle.acquire_undo_lease(conn, task_id, 0, token, 30) is not None
        assert lifecycle.retry_undo_later(conn, task_id, token, 0.0) is not None
    # When the timer sweep runs, the step is queued once
    assert sweeps.wake_due_timers() == 1
    assert queued_steps(redis_url) == 1
    assert tasks.get(task_id)["wake_at"] is None
    assert sweeps.wake_due_timers() == 0


def test_a_cancel_or_a_deadline_leaves_a_compensating_task_alone(flask_app, tasks, redis_url):
    task_id = compensating(tasks, redis_url)
    tasks.scalar(
        "UPDATE tasks SET deadline_at = now() - interval '1 s' WHERE id = :id RETURNING 1",
        id=task_id,
    )
    before = tasks.get(task_id)
    with db.transaction() as conn:
        assert lifecycle.cancel(conn, task_id, tasks.tenant_id) is None
        assert lifecycle.fail_timeout(conn, task_id) is None
    sweeps.expire_task_deadlines()
    after = tasks.get(task_id)
    assert after["status"] == "compensating" and after["last_seq"] == before["last_seq"]
    assert after["compensation"] == before["compensation"]
