"""What one step costs the database, and that the cheaper path keeps every event: a
step commits twice (its lease, then its checkpoint with the progress it reported last),
and reported progress that no checkpoint follows soon is still written within a second.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa

from app.engine import runner
from app.store import db
from tests.harness import wait_until


def _commits_of_this_thread():
    """Counts the commits made from the calling thread (the step runs here; background
    threads, such as the outbox's bulk delete, are not the step's path)."""
    me = threading.get_ident()
    counted: list[str] = []

    def on_commit(conn) -> None:
        if threading.get_ident() == me:
            counted.append("commit")

    sa.event.listen(db.engine(), "commit", on_commit)
    return counted, lambda: sa.event.remove(db.engine(), "commit", on_commit)


def test_an_echo_step_commits_twice_the_lease_then_the_checkpoint_with_its_progress(
    flask_app, tasks
):
    # Given a three-step echo task whose step messages no worker consumes
    task_id = tasks.submit("echo", {"message": "count", "steps": 3})
    counted, stop = _commits_of_this_thread()
    try:
        # When each step is run here, one after the other
        outcomes = []
        for step in range(3):
            before = len(counted)
            outcomes.append(runner.run_step(task_id, step))
            # Then each step committed exactly two transactions
            assert len(counted) - before == 2, (step, counted)
    finally:
        stop()
    assert outcomes == ["continued", "continued", "completed"]

    # And every step still has its progress event, right before its step event, carrying
    # the task as it was during the step (step n, working, that progress)
    events = tasks.rows(
        "SELECT seq, type, data FROM events WHERE task_id = :id ORDER BY seq", id=task_id
    )
    types = [e["type"] for e in events]
    assert types == [
        "task.created",
        "task.started",
        *["task.progress", "task.step.completed"] * 3,
        "task.completed",
    ], types
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    progress = [e for e in events if e["type"] == "task.progress"]
    for n, event in enumerate(progress):
        snapshot = event["data"]["task"]
        assert snapshot["step"] == n and snapshot["status"] == "working", snapshot
        assert snapshot["progress"] == {
            "current": n + 1,
            "total": 3,
            "message": f"step {n + 1} of 3",
        }
    completed = [e for e in events if e["type"] == "task.step.completed"]
    assert [e["data"]["task"]["step"] for e in completed] == [1, 2, 3]
    assert tasks.get(task_id)["progress"]["current"] == 3


def test_progress_reported_before_a_long_computation_is_written_within_a_second(
    celery_worker, tasks
):
    # Given a step that reports progress, then computes for 3 s without its context
    task_id = tasks.submit("test_progress_then_compute", {})

    # Then the progress event is there while the step still runs
    wait_until(
        lambda: "task.progress" in tasks.event_types(task_id), 2.5, what="the progress event"
    )
    row = tasks.get(task_id)
    assert row["status"] == "working" and row["step"] == 0, dict(row)
    assert row["progress"] == {"current": 1, "total": 2, "message": "computing"}
    assert "task.step.completed" not in tasks.event_types(task_id)

    # And the step completes with that one progress event before its checkpoint's
    tasks.wait_status(task_id, "completed", timeout=30)
    types = tasks.event_types(task_id)
    assert types.count("task.progress") == 1
    assert types.index("task.progress") < types.index("task.step.completed")
