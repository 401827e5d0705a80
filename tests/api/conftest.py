"""Fixtures and helpers of the API tests: a second tenant, task submission, and the
lifecycle moves that put a task in a given state without a worker (the worker-driven
paths are covered by the tests that use ``celery_worker``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app import settings as settings_mod
from app.dev.embedded import free_port
from app.settings import Settings
from app.store import db, ids, lifecycle, tenants, tool_calls

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def other_tenant(settings: Settings) -> tenants.CreatedTenant:
    with db.transaction() as conn:
        return tenants.create(conn, f"globex-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def other_auth(other_tenant: tenants.CreatedTenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {other_tenant.api_key}"}


@pytest.fixture
def make_app(settings: Settings) -> Iterator[Any]:
    """``make_app(**changes)``: a Flask app over this test's settings with some changed
    (the previous settings are restored afterwards)."""
    from workers.celery_app import create_app

    def make(**changes: Any):
        return create_app(settings.replace(**changes))

    yield make
    db.dispose()
    settings_mod.configure(settings)


def closed_port_url() -> str:
    """A PostgreSQL URL on which nothing listens (the database is "down")."""
    return f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/outlast"


def submit(client, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    """POST /v1/tasks (an echo task by default); asserts the 202 and returns the task."""
    body.setdefault("agent", "echo")
    body.setdefault("input", {"message": "hello"})
    response = client.post("/v1/tasks", json=body, headers=auth)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def start(task_id: str) -> str:
    """pending -> working, as a worker taking step 0's lease would; the lease token."""
    token = ids.new_token()
    with db.transaction() as conn:
        row = lifecycle.acquire_lease(conn, task_id, 0, token, 30)
    assert row is not None
    return token


def checkpoint(task_id: str, step: int, token: str, calls: int = 0) -> str:
    """Run step ``step`` "by hand": ``calls`` completed tool calls and its checkpoint;
    the task keeps working at step + 1 under a new lease, whose token is returned."""
    from datetime import UTC, datetime

    started = datetime.now(UTC)
    with db.transaction() as conn:
        for index in range(calls):
            key = f"key-{task_id}-{step}-{index}"
            assert tool_calls.begin(
                conn,
                task_id=task_id,
                step=step,
                call_index=index,
                name="http_get",
                key=key,
                args={"url": "https://example.com"},
                lease_token=token,
            )
            tool_calls.complete(conn, task_id, step, index, {"status": 200})
        assert lifecycle.commit_step(
            conn, task_id, step, token, state={"i": step}, started_at=started, attempt=1
        )
    new_token = ids.new_token()
    with db.transaction() as conn:
        assert lifecycle.acquire_lease(conn, task_id, step + 1, new_token, 30)
    return new_token


def complete(task_id: str, result: Any = None) -> None:
    start(task_id)
    with db.transaction() as conn:
        assert lifecycle.complete(conn, task_id, result if result is not None else {"ok": True})


def fail(task_id: str) -> None:
    with db.transaction() as conn:
        assert lifecycle.fail(conn, task_id, "agent_error", "boom")


APPROVAL_SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "comment": {"type": "string"}},
    "required": ["approved"],
}


def ask_for_input(task_id: str) -> None:
    """pending -> working -> input_required with the approval agent's input schema."""
    start(task_id)
    with db.transaction() as conn:
        assert lifecycle.request_input(
            conn, task_id, {"prompt": "Ship it?", "schema": APPROVAL_SCHEMA}
        )


def assert_problem(response, status: int, code: str) -> dict[str, Any]:
    """The answer is an RFC 9457 problem with this status and code."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM_JSON
    body = response.get_json(force=True)
    for member in ("type", "title", "status", "detail", "code"):
        assert member in body, body
    assert body["status"] == status
    assert body["code"] == code, body
    if status == 422:
        assert isinstance(body.get("errors"), dict), body
    return body
