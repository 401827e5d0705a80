"""Driving tasks to webhook events without the engine, and reading deliveries back."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from standardwebhooks import Webhook

from app.store import db, lifecycle
from tests.webhooks.receiver import Received


def finish_task(tenant_id: str, webhook_url: str | None, how: str = "completed") -> str:
    """Create a task and drive it to ``how`` (completed, failed, cancelled or
    input_required) through the lifecycle functions; returns its id."""
    with db.transaction() as conn:
        task = lifecycle.create(
            conn,
            tenant_id=tenant_id,
            agent="echo",
            input={"message": "hi"},
            metadata={},
            webhook_url=webhook_url,
            timeout_seconds=None,
            idempotency_key=None,
        )
        task_id = task["id"]
        if how == "cancelled":
            assert lifecycle.cancel(conn, task_id, tenant_id) is not None
            return task_id
        assert lifecycle.acquire_lease(conn, task_id, 0, "tok", 30) is not None
        if how == "completed":
            assert lifecycle.complete(conn, task_id, {"echo": "hi"}) is not None
        elif how == "failed":
            assert lifecycle.fail(conn, task_id, "agent_error", "boom") is not None
        elif how == "input_required":
            assert lifecycle.request_input(conn, task_id, {"prompt": "ok?", "schema": {}})
        else:
            raise ValueError(how)
    return task_id


def deliveries(task_id: str) -> list[dict[str, Any]]:
    with db.engine().connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, event_id, event_seq, event_type, status::text AS status, attempts, "
                "last_status_code, last_error, next_attempt_at, delivered_at "
                "FROM webhook_deliveries WHERE task_id = :t ORDER BY created_at, event_seq, id"
            ),
            {"t": task_id},
        ).mappings()
        return [dict(r) for r in rows]


def attempts(delivery_id: str) -> list[dict[str, Any]]:
    with db.engine().connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT attempt, status_code, error, duration_ms, attempted_at, retry_at "
                "FROM webhook_attempts WHERE delivery_id = :d ORDER BY attempt"
            ),
            {"d": delivery_id},
        ).mappings()
        return [dict(r) for r in rows]


def stored_event(event_id: str) -> dict[str, Any]:
    from app.store.representation import event_json

    with db.engine().connect() as conn:
        row = (
            conn.execute(
                sa.text(
                    "SELECT task_id, seq, id, type, data, created_at FROM events WHERE id = :id"
                ),
                {"id": event_id},
            )
            .mappings()
            .one()
        )
    return event_json(row)


def verify_with_reference(secret: str, received: Received) -> dict[str, Any]:
    """Verify a delivered request with the ``standardwebhooks`` reference package."""
    return Webhook(secret).verify(received.body, received.headers)


def body_json(received: Received) -> dict[str, Any]:
    return json.loads(received.body)
