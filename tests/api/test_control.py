"""POST /v1/tasks/{id}/cancel and POST /v1/tasks/{id}/input with their conflict rules."""

from __future__ import annotations

import json

import sqlalchemy as sa

from app.store import db
from tests.api.conftest import ask_for_input, assert_problem, complete, fail, start, submit


def event_types(task_id: str) -> list[str]:
    with db.engine().connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT type FROM events WHERE task_id = :id ORDER BY seq"), {"id": task_id}
            ).scalars()
        )


def test_cancel_makes_a_non_terminal_task_cancelled_at_once(client, auth):
    for state in ["pending", "working", "input_required"]:
        task = submit(client, auth)
        if state == "working":
            start(task["id"])
        elif state == "input_required":
            ask_for_input(task["id"])
        response = client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth)
        assert response.status_code == 200
        body = response.get_json()
        assert body["status"] == "cancelled" and body["finished_at"]
        assert body["input_request"] is None
        assert "Retry-After" not in response.headers
        assert event_types(task["id"])[-1] == "task.cancelled"


def test_cancelling_a_cancelled_task_answers_it_again(client, auth):
    task = submit(client, auth)
    first = client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth).get_json()
    again = client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth)
    assert again.status_code == 200 and again.get_json() == first
    assert event_types(task["id"]).count("task.cancelled") == 1


def test_cancelling_a_completed_or_failed_task_is_409_task_terminal(client, auth):
    done, failed = submit(client, auth), submit(client, auth)
    complete(done["id"])
    fail(failed["id"])
    for task, status in [(done, "completed"), (failed, "failed")]:
        assert_problem(
            client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth), 409, "task_terminal"
        )
        assert client.get(f"/v1/tasks/{task['id']}", headers=auth).get_json()["status"] == status


def test_cancel_of_an_unknown_task_is_404(client, auth):
    assert_problem(client.post("/v1/tasks/tsk_nope/cancel", headers=auth), 404, "not_found")


def test_input_resumes_a_waiting_task_and_queues_its_next_step(client, auth):
    task = submit(client, auth, agent="approval", input={"question": "Ship it?"})
    ask_for_input(task["id"])
    response = client.post(
        f"/v1/tasks/{task['id']}/input",
        json={"input": {"approved": True, "comment": "go"}},
        headers=auth,
    )
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] in ("pending", "working")
    assert body["input_request"] is None
    assert event_types(task["id"])[-1] == "task.resumed"
    with db.engine().connect() as conn:
        human_input = conn.execute(
            sa.text("SELECT human_input FROM tasks WHERE id = :id"), {"id": task["id"]}
        ).scalar_one()
    assert human_input == {"approved": True, "comment": "go"}


def test_input_not_matching_the_request_schema_is_422_and_keeps_waiting(client, auth):
    for answer, path in [
        ({}, "input.approved"),
        ({"approved": "yes"}, "input.approved"),
        ({"approved": True, "comment": 5}, "input.comment"),
        ("yes", "input"),
        (None, "input"),
    ]:
        task = submit(client, auth)
        ask_for_input(task["id"])
        response = client.post(
            f"/v1/tasks/{task['id']}/input", json={"input": answer}, headers=auth
        )
        problem = assert_problem(response, 422, "validation_error")
        assert path in problem["errors"], problem["errors"]
        assert (
            client.get(f"/v1/tasks/{task['id']}", headers=auth).get_json()["status"]
            == "input_required"
        )


def test_input_body_without_input_is_422(client, auth):
    task = submit(client, auth)
    ask_for_input(task["id"])
    for body in [{}, {"answer": True}, []]:
        response = client.post(f"/v1/tasks/{task['id']}/input", json=body, headers=auth)
        assert_problem(response, 422, "validation_error")


def test_input_in_any_other_state_is_409_task_not_waiting(client, auth):
    for state in ["pending", "working", "completed", "cancelled", "resumed"]:
        task = submit(client, auth)
        if state == "working":
            start(task["id"])
        elif state == "completed":
            complete(task["id"])
        elif state == "cancelled":
            client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth)
        elif state == "resumed":
            ask_for_input(task["id"])
            client.post(
                f"/v1/tasks/{task['id']}/input", json={"input": {"approved": True}}, headers=auth
            )
        response = client.post(
            f"/v1/tasks/{task['id']}/input", json={"input": {"approved": True}}, headers=auth
        )
        assert_problem(response, 409, "task_not_waiting")


def test_input_body_errors_come_before_the_state(client, auth):
    task = submit(client, auth)
    ask_for_input(task["id"])
    url = f"/v1/tasks/{task['id']}/input"
    assert_problem(
        client.post(url, data="{", headers={**auth, "Content-Type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_problem(
        client.post(
            url, data=json.dumps({"input": 1}), headers={**auth, "Content-Type": "text/plain"}
        ),
        415,
        "unsupported_media_type",
    )


def test_approval_agent_runs_to_input_required_then_completes_with_the_answer(
    client, auth, celery_worker
):
    from tests.harness import wait_until

    task = submit(client, auth, agent="approval", input={"question": "Deploy?"})

    def status() -> dict:
        return client.get(f"/v1/tasks/{task['id']}", headers=auth).get_json()

    waiting = wait_until(lambda: status() if status()["status"] == "input_required" else None, 30)
    assert waiting["input_request"]["prompt"] == "Deploy?"
    answer = {"approved": False, "comment": "not today"}
    response = client.post(f"/v1/tasks/{task['id']}/input", json={"input": answer}, headers=auth)
    assert response.status_code == 202
    done = wait_until(lambda: status() if status()["status"] == "completed" else None, 30)
    assert done["result"] == {"approved": False, "comment": "not today"}
