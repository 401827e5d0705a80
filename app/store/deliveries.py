"""Webhook delivery rows: the one ``INSERT`` of a delivery, and their columns.

A delivery is created in the transaction that writes its event (``lifecycle``) or by a
replay (``app.webhooks.deliveries.replay``); both go through :func:`insert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.store import ids

DELIVERY_COLUMNS = (
    "id, task_id, event_id, event_seq, event_type, url, status::text AS status, attempts, "
    "last_status_code, last_error, next_attempt_at, delivered_at, created_at"
)

INSERT_DELIVERY = sa.text(
    "INSERT INTO webhook_deliveries (id, tenant_id, task_id, event_id, event_seq, "
    "event_type, url, next_attempt_at) "
    "VALUES (:id, :tenant_id, :task_id, :event_id, :seq, :type, :url, now()) "
    f"RETURNING {DELIVERY_COLUMNS}"
)


def insert(
    conn: Connection, task: Mapping[str, Any], event_id: str, seq: int, event_type: str
) -> RowMapping:
    """A pending delivery of event ``event_id`` to the task's ``webhook_url``, due now
    (the caller adds its outbox message)."""
    return (
        conn.execute(
            INSERT_DELIVERY,
            {
                "id": ids.new_id("dlv"),
                "tenant_id": task["tenant_id"],
                "task_id": task["id"],
                "event_id": event_id,
                "seq": seq,
                "type": str(event_type),
                "url": task["webhook_url"],
            },
        )
        .mappings()
        .one()
    )
