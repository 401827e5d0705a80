"""The named queries the API's views run (reads; writes go through ``app.store``).

Kept here, beside the views, so that the SQL a request runs is visible in one place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.store.representation import TASK_COLUMNS

# A task of this tenant, locked: the state checked is the state changed.
LOCK_TASK = sa.text(
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :id AND tenant_id = :tenant_id FOR UPDATE"
)

# The checkpoint log of GET /v1/tasks/{id}/steps, oldest first.
CHECKPOINTS = sa.text(
    "SELECT step_index, started_at, finished_at FROM checkpoints "
    "WHERE task_id = :task_id ORDER BY step_index"
)

# A page of events after a seq, oldest first (the JSON page and the SSE stream).
EVENTS_AFTER = sa.text(
    "SELECT task_id, seq, id, type, data, created_at FROM events "
    "WHERE task_id = :task_id AND seq > :after ORDER BY seq LIMIT :limit"
)

# The status of a task, nothing else (an SSE stream checks it between pages).
TASK_STATUS = sa.text("SELECT status::text FROM tasks WHERE id = :id")


def list_tasks(
    conn: Connection,
    tenant_id: str,
    *,
    limit: int,
    status: str | None = None,
    agent: str | None = None,
    acknowledged: bool | None = None,
    before: tuple[datetime, str] | None = None,
) -> list[RowMapping]:
    """Up to ``limit`` of the tenant's tasks, newest first, optionally filtered; ``before``
    is the (created_at, id) of a cursor. Each filter is served by an index of 0001, and
    ``acknowledged=False`` by ``tasks_tenant_unacknowledged`` of 0002."""
    where = ["tenant_id = :tenant_id"]
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit}
    if status is not None:
        where.append("status = CAST(:status AS task_status)")
        params["status"] = status
    if agent is not None:
        where.append("agent = :agent")
        params["agent"] = agent
    if acknowledged is False:
        # Spelled as the partial index's predicate, so the planner can use it.
        where.append("acknowledged_at IS NULL AND status IN ('completed', 'failed', 'cancelled')")
    elif acknowledged is True:
        where.append("acknowledged_at IS NOT NULL")  # only terminal tasks are acknowledged
    if before is not None:
        params["c_at"], params["c_id"] = before
        where.append("(created_at, id) < (:c_at, :c_id)")
    sql = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
        "ORDER BY created_at DESC, id DESC LIMIT :limit"
    )
    return list(conn.execute(sa.text(sql), params).mappings())
