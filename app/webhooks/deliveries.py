"""Webhook deliveries as the API shows them: the list of a task's deliveries, and replay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.store import deliveries as delivery_rows
from app.store import outbox
from app.store.deliveries import DELIVERY_COLUMNS
from app.store.lifecycle import WEBHOOK_EVENT_TYPES
from app.store.representation import rfc3339


def delivery_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The delivery object of API.md."""
    return {
        "id": row["id"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "url": row["url"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "next_attempt_at": rfc3339(row["next_attempt_at"]),
        "delivered_at": rfc3339(row["delivered_at"]),
    }


def list_for_task(conn: Connection, task_id: str, tenant_id: str) -> list[dict[str, Any]]:
    """Every delivery of a task, oldest first (replays included)."""
    rows = conn.execute(
        sa.text(
            f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries "
            "WHERE task_id = :task_id AND tenant_id = :tenant_id ORDER BY created_at, event_seq, id"
        ),
        {"task_id": task_id, "tenant_id": tenant_id},
    ).mappings()
    return [delivery_json(r) for r in rows]


def replay(conn: Connection, task: Mapping[str, Any], after: int = 0) -> list[dict[str, Any]]:
    """Queue a fresh delivery of each of the task's webhook events with ``seq > after``
    (same event, so the same ``webhook-id``; each attempt signs anew). Returns the
    deliveries created; none when the task has no ``webhook_url``."""
    if not task.get("webhook_url"):
        return []
    events = conn.execute(
        sa.text(
            "SELECT id, seq, type FROM events WHERE task_id = :task_id AND seq > :after "
            "AND type = ANY(:types) ORDER BY seq"
        ),
        {"task_id": task["id"], "after": after, "types": sorted(WEBHOOK_EVENT_TYPES)},
    ).mappings()
    created = []
    for event in list(events):
        row = delivery_rows.insert(conn, task, event["id"], event["seq"], event["type"])
        outbox.add_delivery(conn, row["id"])
        created.append(delivery_json(row))
    return created
