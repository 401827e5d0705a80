"""POST /v1/tasks: 202 after a durable write, and every refusal API.md names."""

from __future__ import annotations

import json
import time

import sqlalchemy as sa

from app.dev.embedded import free_port
from app.store import db
from tests.api.conftest import assert_problem, closed_port_url, submit


def test_submission_is_202_with_location_and_a_pending_task(client, auth):
    response = client.post(
        "/v1/tasks",
        json={
            "agent": "echo",
            "input": {"message": "hi", "steps": 2},
            "metadata": {"order": 7, "tags": ["a"]},
            "timeout_seconds": 60,
        },
        headers=auth,
    )
    assert response.status_code == 202
    task = response.get_json()
    assert response.headers["Location"] == f"/v1/tasks/{task['id']}"
    assert "Idempotent-Replayed" not in response.headers
    assert task["id"].startswith("tsk_") and len(task["id"]) <= 64
    assert task["object"] == "task"
    assert task["status"] == "pending"
    assert task["input"] == {"message": "hi", "steps": 2}
    assert task["metadata"] == {"order": 7, "tags": ["a"]}
    assert task["step"] == 0 and task["attempt"] == 1
    assert task["result"] is None and task["error"] is None and task["input_request"] is None
    assert task["created_at"].endswith("Z")


def test_submission_commits_task_event_and_step_message_together(client, auth):
    task = submit(client, auth)
    with db.engine().connect() as conn:
        stored = conn.execute(
            sa.text("SELECT status::text, deadline_at FROM tasks WHERE id = :id"),
            {"id": task["id"]},
        ).one()
        events = conn.execute(
            sa.text("SELECT seq, type FROM events WHERE task_id = :id"), {"id": task["id"]}
        ).all()
    assert stored.status == "pending" and stored.deadline_at is None
    assert [(e.seq, e.type) for e in events] == [(1, "task.created")]


def test_defaults_input_and_metadata_to_empty_objects(client, auth):
    task = submit(client, auth, agent="echo", input={"message": "m"})
    assert task["metadata"] == {} and task["webhook_url"] is None


def test_invalid_json_is_400_invalid_json(client, auth):
    for raw in [b"{", b"{'agent': 1}", b'{"agent": NaN}', b"\xff\xfe", b'{"a": 1e999}', b""]:
        response = client.post(
            "/v1/tasks", data=raw, headers={**auth, "Content-Type": "application/json"}
        )
        assert_problem(response, 400, "invalid_json")


def test_non_json_content_type_is_415(client, auth):
    for content_type in [None, "text/plain", "application/x-www-form-urlencoded"]:
        headers = dict(auth)
        if content_type:
            headers["Content-Type"] = content_type
        body = json.dumps({"agent": "echo", "input": {"message": "x"}})
        assert_problem(
            client.post("/v1/tasks", data=body, headers=headers), 415, "unsupported_media_type"
        )


def test_json_content_type_with_charset_or_suffix_is_accepted(client, auth):
    body = json.dumps({"agent": "echo", "input": {"message": "x"}})
    for content_type in ["application/json; charset=utf-8", "application/merge+json"]:
        response = client.post(
            "/v1/tasks", data=body, headers={**auth, "Content-Type": content_type}
        )
        assert response.status_code == 202


def test_body_over_max_body_bytes_is_413(make_app, tenant):
    client = make_app(max_body_bytes=200).test_client()
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    small = {"agent": "echo", "input": {"message": "x"}}
    assert client.post("/v1/tasks", json=small, headers=auth).status_code == 202
    big = {"agent": "echo", "input": {"message": "x" * 300}}
    assert_problem(client.post("/v1/tasks", json=big, headers=auth), 413, "payload_too_large")


def test_invalid_submission_is_422_naming_the_field(client, auth):
    for body, field in [
        ({"agent": "no-such-agent"}, "agent"),
        ({"input": {"message": "x"}}, "agent"),
        ({"agent": 5, "input": {"message": "x"}}, "agent"),
        ({"agent": "echo", "input": {}}, "input.message"),
        ({"agent": "echo", "input": {"message": 5}}, "input.message"),
        ({"agent": "echo", "input": {"message": "x", "steps": 0}}, "input.steps"),
        ({"agent": "echo", "input": []}, "input"),
        ({"agent": "echo", "input": None}, "input"),
        ({"agent": "echo", "input": {"message": "x"}, "metadata": "m"}, "metadata"),
        ({"agent": "echo", "input": {"message": "x"}, "timeout_seconds": 0}, "timeout_seconds"),
        (
            {"agent": "echo", "input": {"message": "x"}, "timeout_seconds": 604801},
            "timeout_seconds",
        ),
        ({"agent": "echo", "input": {"message": "x"}, "timeout_seconds": 1.5}, "timeout_seconds"),
        ({"agent": "echo", "input": {"message": "x"}, "timeout_seconds": "60"}, "timeout_seconds"),
        ({"agent": "echo", "input": {"message": "x"}, "timeout_seconds": True}, "timeout_seconds"),
        (
            {"agent": "echo", "input": {"message": "x"}, "webhook_url": "ftp://example.com/"},
            "webhook_url",
        ),
        ({"agent": "echo", "input": {"message": "x"}, "webhook_url": 7}, "webhook_url"),
        ({"agent": "echo", "input": {"message": "x"}, "timeout": 60}, "timeout"),
        ({"agent": "echo", "input": {"message": "x\u0000"}}, "input.message"),
    ]:
        problem = assert_problem(
            client.post("/v1/tasks", json=body, headers=auth), 422, "validation_error"
        )
        assert field in problem["errors"], problem["errors"]
        assert all(isinstance(m, str) for m in problem["errors"][field])
        assert client.get("/v1/tasks", headers=auth).get_json()["data"] == []


def test_body_that_is_not_an_object_is_422(client, auth):
    for body in [[1, 2], "echo", 5, None]:
        response = client.post(
            "/v1/tasks", data=json.dumps(body), headers={**auth, "Content-Type": "application/json"}
        )
        assert_problem(response, 422, "validation_error")


def test_metadata_holds_at_most_32_keys(client, auth):
    ok = {f"k{i}": i for i in range(32)}
    assert submit(client, auth, metadata=ok)["metadata"] == ok
    too_many = {f"k{i}": i for i in range(33)}
    response = client.post(
        "/v1/tasks",
        json={"agent": "echo", "input": {"message": "x"}, "metadata": too_many},
        headers=auth,
    )
    assert "metadata" in assert_problem(response, 422, "validation_error")["errors"]


def test_timeout_seconds_bounds_are_inclusive(client, auth):
    assert submit(client, auth, timeout_seconds=1)["status"] == "pending"
    assert submit(client, auth, timeout_seconds=604800)["status"] == "pending"


def test_private_or_non_http_webhook_url_is_422(make_app, tenant):
    for url in [
        "http://127.0.0.1/hook",
        "http://localhost/hook",
        "http://10.0.0.8/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:a00:1]/hook",
        "http://224.0.0.1/hook",
        "http://240.0.0.1/hook",
        "http://0.0.0.0/hook",
        "javascript:alert(1)",
        "https://user:pw@8.8.8.8/hook",
    ]:
        client = make_app(webhook_allow_private=False).test_client()
        auth = {"Authorization": f"Bearer {tenant.api_key}"}
        body = {"agent": "echo", "input": {"message": "x"}, "webhook_url": url}
        problem = assert_problem(
            client.post("/v1/tasks", json=body, headers=auth), 422, "validation_error"
        )
        assert list(problem["errors"]) == ["webhook_url"]


def test_public_webhook_url_is_accepted_and_private_one_when_allowed(make_app, tenant):
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    strict = make_app(webhook_allow_private=False).test_client()
    public = {"agent": "echo", "input": {"message": "x"}, "webhook_url": "https://8.8.8.8/hook"}
    assert strict.post("/v1/tasks", json=public, headers=auth).status_code == 202
    relaxed = make_app(webhook_allow_private=True).test_client()
    private = {**public, "webhook_url": "http://127.0.0.1:9/hook"}
    response = relaxed.post("/v1/tasks", json=private, headers=auth)
    assert response.status_code == 202
    assert response.get_json()["webhook_url"] == "http://127.0.0.1:9/hook"


def test_database_down_is_503_with_retry_after(make_app):
    client = make_app(database_url=closed_port_url()).test_client()
    auth = {"Authorization": "Bearer olk_anything"}
    body = {"agent": "echo", "input": {"message": "x"}}
    for response in [
        client.post("/v1/tasks", json=body, headers=auth),
        client.get("/v1/tasks", headers=auth),
        client.get("/v1/tasks/tsk_x", headers=auth),
    ]:
        assert_problem(response, 503, "unavailable")
        assert int(response.headers["Retry-After"]) > 0


def test_broker_down_still_accepts_promptly_and_keeps_the_step_in_the_outbox(make_app, tenant):
    client = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0").test_client()
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    began = time.monotonic()
    response = client.post(
        "/v1/tasks", json={"agent": "echo", "input": {"message": "x"}}, headers=auth
    )
    elapsed = time.monotonic() - began
    assert response.status_code == 202
    assert elapsed < 5, f"a down broker stalled the submission for {elapsed:.1f}s"
    with db.engine().connect() as conn:
        queued = conn.execute(
            sa.text("SELECT args FROM outbox WHERE task_id = :id"),
            {"id": response.get_json()["id"]},
        ).scalar_one()
    assert queued == [response.get_json()["id"], 0]


def test_deeply_nested_or_unstorable_bodies_are_refused_not_500(client, auth):
    headers = {**auth, "Content-Type": "application/json"}
    # Refused by the depth check (422) or by the parser's own limit (400); never a 500.
    for depth, status in [(70, {422}), (990, {400, 422}), (100000, {400})]:
        nested = (
            '{"agent": "echo", "input": {"message": "x", "deep": '
            + "[" * depth
            + "]" * depth
            + "}}"
        )
        response = client.post("/v1/tasks", data=nested, headers=headers)
        assert response.status_code in status, (depth, response.get_data(as_text=True)[:300])
    lone_surrogate = '{"agent": "echo", "input": {"message": "\\ud800"}}'
    problem = assert_problem(
        client.post("/v1/tasks", data=lone_surrogate, headers=headers), 422, "validation_error"
    )
    assert "input.message" in problem["errors"]
    nul_key = '{"agent": "echo", "input": {"message": "x"}, "metadata": {"a\\u0000": 1}}'
    assert_problem(client.post("/v1/tasks", data=nul_key, headers=headers), 422, "validation_error")
