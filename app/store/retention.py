"""How long a task is kept (V2.md section 4): its acknowledgement, and its deletion with
every row recorded about it, by ``DELETE /v1/tasks/{id}`` or by the retention purge.

``acknowledged_at`` is not a status: acknowledging changes nothing that
:mod:`app.store.lifecycle` (the one writer of status) guards, and only a terminal task,
whose status never changes again, can be acknowledged.

Deleting a task removes, in the caller's transaction: its webhook deliveries with their
attempts and the outbox messages that would send them, its Idempotency-Key (so the key
creates a new task afterwards), and the task row, whose events, checkpoints, tool-call
log and step messages go with it (``ON DELETE CASCADE`` in 0001). A deliver message
already on the broker then finds no delivery row and sends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.engine import Connection, RowMapping

from app.errors import NotFound, TaskNotTerminal
from app.store import db, db_errors, lifecycle, messages
from app.store.representation import TASK_COLUMNS

# A delete that deadlocks with a webhook sender recording an attempt is tried again.
DELETE_ATTEMPTS = 3

_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(lifecycle.TERMINAL))

# The first acknowledgement sets the time; later ones keep it.
_ACKNOWLEDGE = sa.text(
    "UPDATE tasks SET acknowledged_at = COALESCE(acknowledged_at, now()) "
    f"WHERE id = :id AND tenant_id = :tenant_id AND status IN ({_TERMINAL_SQL}) "
    f"RETURNING {TASK_COLUMNS}"
)

_LOCK_FOR_DELETE = sa.text(
    "SELECT status::text AS status FROM tasks WHERE id = :id AND tenant_id = :tenant_id FOR UPDATE"
)

# Deliver messages name their delivery, not their task (outbox.add_delivery); the outbox
# holds only what is not yet published, so this scan is short.
_DELETE_DELIVERY_MESSAGES = sa.text(
    "DELETE FROM outbox WHERE task_id IS NULL AND task_name = :deliver "
    "AND args->>0 IN (SELECT id FROM webhook_deliveries WHERE task_id = ANY(:ids))"
)
# Attempts go with their deliveries (ON DELETE CASCADE).
_DELETE_DELIVERIES = sa.text("DELETE FROM webhook_deliveries WHERE task_id = ANY(:ids)")
# Before the task: its foreign key would only set task_id to NULL.
_DELETE_KEYS = sa.text("DELETE FROM idempotency_keys WHERE task_id = ANY(:ids)")
# A deleted parent's children stay, without a parent; their spawn_key goes too, as the
# CHECK tasks_spawn_key_iff_parent wants (ON DELETE SET NULL would clear parent_id only).
_ORPHAN_CHILDREN = sa.text(
    "UPDATE tasks SET parent_id = NULL, spawn_key = NULL WHERE parent_id = ANY(:ids)"
)
_DELETE_TASKS = sa.text("DELETE FROM tasks WHERE id = ANY(:ids)")


def _refusal(status: str | None, action: str) -> Exception:
    """Why a task of this ``status`` (``None``: not the tenant's) cannot be ``action``."""
    if status is None:
        return NotFound("No task with this id.")
    return TaskNotTerminal(f"The task is {status}; only a finished task can be {action}.")


def acknowledge(conn: Connection, task_id: str, tenant_id: str) -> RowMapping:
    """The tenant's terminal task with ``acknowledged_at`` set (the first time only).

    Raises :class:`NotFound` (no such task for this tenant) or :class:`TaskNotTerminal`.
    """
    row = conn.execute(_ACKNOWLEDGE, {"id": task_id, "tenant_id": tenant_id}).mappings().first()
    if row is None:
        current = lifecycle.get(conn, task_id, tenant_id)
        raise _refusal(current["status"] if current else None, "acknowledged")
    return row


def delete_rows(conn: Connection, task_ids: Sequence[str]) -> int:
    """Delete the tasks ``task_ids`` and every row about them; the caller has checked
    that they are terminal (and locked them). Returns how many tasks were deleted."""
    if not task_ids:
        return 0
    ids = list(task_ids)
    conn.execute(_DELETE_DELIVERY_MESSAGES, {"ids": ids, "deliver": messages.DELIVER_WEBHOOK})
    conn.execute(_DELETE_DELIVERIES, {"ids": ids})
    conn.execute(_DELETE_KEYS, {"ids": ids})
    conn.execute(_ORPHAN_CHILDREN, {"ids": ids})
    return conn.execute(_DELETE_TASKS, {"ids": ids}).rowcount


def delete(task_id: str, tenant_id: str) -> None:
    """Delete the tenant's terminal task at once, with everything recorded about it, in
    one transaction.

    Raises :class:`NotFound` (no such task for this tenant, or already deleted) or
    :class:`TaskNotTerminal`.
    """
    for attempt in range(1, DELETE_ATTEMPTS + 1):
        try:
            with db.transaction() as conn:
                row = conn.execute(
                    _LOCK_FOR_DELETE, {"id": task_id, "tenant_id": tenant_id}
                ).one_or_none()
                if row is None or row.status not in lifecycle.TERMINAL:
                    raise _refusal(row.status if row else None, "deleted")
                delete_rows(conn, [task_id])
            return
        except sa_exc.OperationalError as exc:
            deadlocked = db_errors.sqlstate(exc) == db_errors.DEADLOCK_DETECTED
            if not deadlocked or attempt == DELETE_ATTEMPTS:
                raise
