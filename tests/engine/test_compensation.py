"""Compensation (V2.md sections 2, 5 and 10): a failed or cancelled task's completed
calls are undone newest first, each once, with ``<key>-undo``, by a real worker.

The callee is a local HTTP server that records every request (the ``calls`` agent
POSTs each call and DELETEs each undo); no beat runs here, so the tests call the timer
sweep themselves where an undo waits for its backoff.
"""

from __future__ import annotations

import threading
from typing import Any

from app.engine import sweeps
from app.store import db, lifecycle
from tests.engine.servers import LocalServer, Received, json_answer
from tests.harness import wait_until


def _callee(answer_delete: Any = None, hold: threading.Event | None = None, hold_step=None):
    """A callee answering POSTs 200 (holding the POST of step ``hold_step`` until
    ``hold`` is set) and DELETEs with ``answer_delete(request)`` (default 200)."""

    def handler(request: Received):
        if request.method == "POST" and hold is not None and request.json["step"] == hold_step:
            hold.wait(30)
        if request.method == "DELETE" and answer_delete is not None:
            return answer_delete(request)
        return json_answer(200, {"ok": True})

    return LocalServer(handler)


def _requests(server: LocalServer, method: str) -> list[Received]:
    with server._lock:
        return [r for r in server.requests if r.method == method]


def _wait_terminal(tasks, task_id: str, timeout: float = 60.0):
    def terminal():
        sweeps.wake_due_timers()  # the beat's timer sweep: undo backoffs and in-flight waits
        row = tasks.get(task_id)
        return row if row["status"] in lifecycle.TERMINAL else None

    return wait_until(terminal, timeout, interval=0.1, what=f"{task_id} terminal")


def _post_keys(server: LocalServer, task_id: str) -> dict[int, str]:
    return {
        r.json["step"]: r.key for r in _requests(server, "POST") if r.json["task_id"] == task_id
    }


def test_failure_at_call_4_undoes_calls_3_2_1_newest_first_once_each(
    celery_worker, tasks, client, auth
):
    # Given a calls task with compensate whose fourth call fails the step
    server = _callee()
    try:
        task_id = tasks.submit(
            "calls", {"url": server.url, "calls": 5, "compensate": True, "fail_at_call": 4}
        )
        # When it fails
        task = _wait_terminal(tasks, task_id)
    finally:
        server.close()

    # Then calls 3, 2 and 1 were undone in that order, once each, keyed <key>-undo,
    # each DELETE carrying the original call's task_id, step and key
    posts = _post_keys(server, task_id)
    assert sorted(posts) == [0, 1, 2]
    deletes = _requests(server, "DELETE")
    assert [r.json for r in deletes] == [
        {"task_id": task_id, "step": s, "key": posts[s]} for s in (2, 1, 0)
    ]
    assert [r.key for r in deletes] == [posts[s] + "-undo" for s in (2, 1, 0)]
    # and the task failed with the error of the failure that started it
    assert task["status"] == "failed"
    assert task["compensation"] == {"reason": "failed", "total": 3, "done": 3, "failed": 0}
    assert task["error"]["type"] == "agent_error"
    assert "fail_at_call" in task["error"]["message"]
    assert task["finished_at"] is not None
    types = tasks.event_types(task_id)
    assert types.count("task.compensating") == 1
    assert types[-2:] == ["task.compensating", "task.failed"]

    # And GET /steps lists each undo after its call, with kind
    answer = client.get(f"/v1/tasks/{task_id}/steps", headers=auth)
    assert answer.status_code == 200
    listed = [
        (s["index"], c["kind"], c["idempotency_key"], c["status"])
        for s in answer.get_json()["data"]
        for c in s["tool_calls"]
    ]
    assert listed == [
        row
        for s in (0, 1, 2)
        for row in (
            (s, "call", posts[s], "completed"),
            (s, "compensation", posts[s] + "-undo", "completed"),
        )
    ]
    body = client.get(f"/v1/tasks/{task_id}", headers=auth).get_json()
    assert body["compensation"] == {"reason": "failed", "total": 3, "done": 3, "failed": 0}


def test_a_task_with_nothing_to_undo_fails_as_before(celery_worker, tasks):
    # Given calls without compensate, failing at its second call
    server = _callee()
    try:
        task_id = tasks.submit("calls", {"url": server.url, "calls": 3, "fail_at_call": 2})
        task = _wait_terminal(tasks, task_id)
    finally:
        server.close()
    # Then it fails at once: nothing undone, compensation null, no task.compensating
    assert task["status"] == "failed" and task["compensation"] is None
    assert _requests(server, "DELETE") == []
    assert "task.compensating" not in tasks.event_types(task_id)


def test_an_undo_answering_500_forever_counts_as_failed_after_its_retries(celery_worker, tasks):
    # Given a calls task with compensate whose undo target answers 500 to every DELETE
    server = _callee(answer_delete=lambda r: json_answer(500, {"error": "down"}))
    try:
        task_id = tasks.submit(
            "calls", {"url": server.url, "calls": 3, "compensate": True, "fail_at_call": 3}
        )
        # When it fails, and both undos keep failing
        task = _wait_terminal(tasks, task_id, timeout=90)
    finally:
        server.close()

    # Then it is not stuck: failed, both undos counted in failed after their retries
    assert task["status"] == "failed"
    assert task["compensation"] == {"reason": "failed", "total": 2, "done": 0, "failed": 2}
    posts = _post_keys(server, task_id)
    deletes = _requests(server, "DELETE")
    tries = 3 + 1  # OUTLAST_STEP_RETRIES (default 3) + 1 engine tries, 4 DELETEs each
    assert [r.key for r in deletes] == (
        [posts[1] + "-undo"] * 4 * tries + [posts[0] + "-undo"] * 4 * tries
    )
    rows = tasks.rows(
        "SELECT step_index, status, attempts, error->>'final' AS final FROM tool_calls "
        "WHERE task_id = :id AND kind = 'compensation' ORDER BY step_index",
        id=task_id,
    )
    assert [dict(r) for r in rows] == [
        {"step_index": s, "status": "failed", "attempts": tries, "final": "true"} for s in (0, 1)
    ]


def test_an_undo_answered_4xx_is_final_at_once_and_the_next_goes_on(celery_worker, tasks):
    # Given an undo target that refuses the undo of call 2 with 409 and accepts call 1's
    def answer(request: Received):
        return json_answer(409 if request.json["step"] == 1 else 200, {})

    server = _callee(answer_delete=answer)
    try:
        task_id = tasks.submit(
            "calls", {"url": server.url, "calls": 3, "compensate": True, "fail_at_call": 3}
        )
        task = _wait_terminal(tasks, task_id)
    finally:
        server.close()
    # Then the 409 was not retried, and call 1 was still undone
    assert [r.json["step"] for r in _requests(server, "DELETE")] == [1, 0]
    assert task["status"] == "failed"
    assert task["compensation"] == {"reason": "failed", "total": 2, "done": 1, "failed": 1}


def test_cancel_during_call_3_answers_202_and_undoes_2_1_and_3_once_it_completed(
    celery_worker, tasks, client, auth
):
    # Given a calls task with compensate whose third call (step 2) is held open
    release = threading.Event()
    server = _callee(hold=release, hold_step=2)
    try:
        task_id = tasks.submit("calls", {"url": server.url, "calls": 5, "compensate": True})
        wait_until(lambda: 2 in _post_keys(server, task_id), 20, what="call 3 in flight")

        # When it is cancelled during that call
        answer = client.post(f"/v1/tasks/{task_id}/cancel", headers=auth)

        # Then the cancel answers 202 with the task compensating
        assert answer.status_code == 202, answer.get_json()
        body = answer.get_json()
        assert body["status"] == "compensating"
        assert body["compensation"] == {"reason": "cancelled", "total": 2, "done": 0, "failed": 0}
        assert body["error"] is None
        # and cancelling again answers 200 with the task as it is
        again = client.post(f"/v1/tasks/{task_id}/cancel", headers=auth)
        assert again.status_code == 200 and again.get_json()["status"] == "compensating"

        # When call 3 then completes
        release.set()
        task = _wait_terminal(tasks, task_id)
    finally:
        release.set()
        server.close()

    # Then it is cancelled with calls 3, 2 and 1 undone, newest first, and no call
    # other than undos started after the cancel (no POST for step 3)
    posts = _post_keys(server, task_id)
    assert sorted(posts) == [0, 1, 2]
    assert [r.key for r in _requests(server, "DELETE")] == [posts[s] + "-undo" for s in (2, 1, 0)]
    assert task["status"] == "cancelled" and task["error"] is None
    assert task["compensation"] == {"reason": "cancelled", "total": 3, "done": 3, "failed": 0}
    types = tasks.event_types(task_id)
    assert types.count("task.compensating") == 1 and types[-1] == "task.cancelled"


def test_a_cancel_during_a_failures_compensation_changes_nothing(
    celery_worker, tasks, client, auth
):
    # Given a failed calls task whose first undo is held open by the callee
    release = threading.Event()

    def answer(request: Received):
        release.wait(30)
        return json_answer(200, {})

    server = _callee(answer_delete=answer)
    try:
        task_id = tasks.submit(
            "calls", {"url": server.url, "calls": 3, "compensate": True, "fail_at_call": 3}
        )
        wait_until(lambda: _requests(server, "DELETE"), 20, what="the first undo in flight")
        # When the client cancels it meanwhile
        answer_ = client.post(f"/v1/tasks/{task_id}/cancel", headers=auth)
        # Then it answers 200 with the task as it is, and the task still ends failed
        assert answer_.status_code == 200
        assert answer_.get_json()["status"] == "compensating"
        assert answer_.get_json()["compensation"]["reason"] == "failed"
        assert answer_.get_json()["error"]["type"] == "agent_error"
        release.set()
        task = _wait_terminal(tasks, task_id)
    finally:
        release.set()
        server.close()
    assert task["status"] == "failed"
    assert task["compensation"] == {"reason": "failed", "total": 2, "done": 2, "failed": 0}
    assert "task.cancelled" not in tasks.event_types(task_id)


def test_budgets_never_block_an_undo(celery_worker, tasks):
    # Given a task whose budget allows three tool calls, then refuses the fourth
    server = _callee()
    try:
        with db.transaction() as conn:
            row = lifecycle.create(
                conn,
                tenant_id=tasks.tenant_id,
                agent="calls",
                input={"url": server.url, "calls": 5, "compensate": True},
                metadata={},
                webhook_url=None,
                timeout_seconds=None,
                idempotency_key=None,
                budget={"max_tool_calls": 3, "on_exhausted": "fail"},
            )
            from app.store import outbox

            outbox.add_step(conn, row["id"], 0)
        task = _wait_terminal(tasks, row["id"])
    finally:
        server.close()
    # Then the task fails with budget_exceeded and all three calls are still undone
    assert task["status"] == "failed" and task["error"]["type"] == "budget_exceeded"
    assert len(_requests(server, "DELETE")) == 3
    assert task["compensation"] == {"reason": "failed", "total": 3, "done": 3, "failed": 0}


def test_the_deadline_sweep_does_not_fail_a_compensating_task_again(celery_worker, tasks):
    # Given a failed task compensating with its undo held open, past its deadline
    release = threading.Event()

    def answer(request: Received):
        release.wait(30)
        return json_answer(200, {})

    server = _callee(answer_delete=answer)
    try:
        task_id = tasks.submit(
            "calls",
            {"url": server.url, "calls": 3, "compensate": True, "fail_at_call": 2},
            timeout_seconds=600,
        )
        wait_until(lambda: _requests(server, "DELETE"), 20, what="the undo in flight")
        tasks.scalar(
            "UPDATE tasks SET deadline_at = now() - interval '1 s' WHERE id = :id RETURNING id",
            id=task_id,
        )
        # When the deadline sweep runs
        sweeps.expire_task_deadlines()
        # Then the task is still compensating, its error the original failure's
        row = tasks.get(task_id)
        assert row["status"] == "compensating" and row["error"]["type"] == "agent_error"
        release.set()
        task = _wait_terminal(tasks, task_id)
    finally:
        release.set()
        server.close()
    assert task["status"] == "failed" and task["error"]["type"] == "agent_error"
    assert task["compensation"]["done"] == 1
