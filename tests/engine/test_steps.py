"""The step engine with a real in-process worker: checkpoints, outcomes, failures."""

from __future__ import annotations


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
