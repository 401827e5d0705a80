"""The public JSON shapes of API.md, built from database rows in one place."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# Columns of ``tasks`` that every query returning a task selects.
TASK_COLUMNS = (
    "id, tenant_id, agent, status::text AS status, input, metadata, step, progress, result, "
    "error, input_request, attempt, webhook_url, created_at, updated_at, started_at, "
    "finished_at, last_seq, lease_token, deadline_at, timeout_seconds, wake_at, human_input, "
    "usage, budget, agent_version, acknowledged_at, compensation, parent_id"
)


def rfc3339(value: datetime | None) -> str | None:
    """``2026-11-28T08:17:12.123Z``: UTC, milliseconds, a ``Z``."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def task_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The task object of API.md from a row selected with :data:`TASK_COLUMNS`."""
    return {
        "id": row["id"],
        "object": "task",
        "agent": row["agent"],
        "status": row["status"],
        "input": row["input"],
        "metadata": row["metadata"],
        "step": row["step"],
        "progress": row["progress"],
        "result": row["result"],
        "error": row["error"],
        "input_request": row["input_request"],
        "attempt": row["attempt"],
        "webhook_url": row["webhook_url"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "usage": row["usage"],  # V2.md section 1: what the task really spent
        "budget": row["budget"],  # V2.md section 3: as submitted, extensions applied
        "agent_version": row["agent_version"],
        "acknowledged_at": rfc3339(row["acknowledged_at"]),
        # V2.md section 5: null when nothing was to be undone
        "compensation": row["compensation"],
        "parent_id": row["parent_id"],  # V2.md section 6: the task that spawned this one
    }


# Fields of the task that an event's snapshot leaves out (V2.md 8: the input can be
# large and is in GET /v1/tasks/{id}; copying it into every event multiplied it).
EVENT_TASK_OMITS = frozenset({"input"})


def event_task_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The task as an event (and its webhook) carries it: :func:`task_json` without
    ``input``. This is what ``events.data`` stores."""
    return {k: v for k, v in task_json(row).items() if k not in EVENT_TASK_OMITS}


def event_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The event object of API.md from an ``events`` row (an older row's snapshot loses
    its ``input`` here, as new rows are stored without it)."""
    data = row["data"]
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, dict) and EVENT_TASK_OMITS & task.keys():
        data = {**data, "task": {k: v for k, v in task.items() if k not in EVENT_TASK_OMITS}}
    return {
        "id": row["id"],
        "type": row["type"],
        "task_id": row["task_id"],
        "seq": row["seq"],
        "timestamp": rfc3339(row["created_at"]),
        "data": data,
    }
