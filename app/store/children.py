"""Child tasks (V2.md section 6): the SQL of spawning, waiting and waking a parent.

A child is an ordinary task with ``parent_id`` and ``spawn_key`` (``"<step>:<spawn
index>"`` of the parent's ``ctx.spawn`` call, unique per parent: a re-run of the step
finds the child instead of making a second one). A parent that returns
``ctx.wait_for(ids, mode)`` keeps ``status = 'working'`` with ``waiting_for = {"ids",
"mode"}``, no lease, no timer and no queued step, so it holds no worker.

The wake-up, and why it is never lost:

- :func:`on_child_terminal` runs inside the transaction that makes a child terminal
  (:func:`app.store.lifecycle.append_event`, the one place every terminal event goes
  through). It takes a transaction-scoped advisory lock on the parent's id, reads the
  parent, and if it waits and :data:`READY` holds, clears ``waiting_for`` and queues
  its next step (outbox row) in that same transaction.
- :func:`wait` (the parent's checkpoint) takes the same advisory lock before it checks
  the condition. The two checks are therefore serialized: whichever runs second sees
  the other's commit (READ COMMITTED gives each statement a fresh snapshot), so either
  the checkpoint sees the child terminal and queues the step itself, or the child sees
  the parent waiting and wakes it.
- The parent row is locked with ``SKIP LOCKED`` by a child: a cancel cascading from the
  parent holds the parent and then waits for its children, so a child that waited for
  the parent would deadlock with it. When the row is busy, the wake is tried again
  right after the child's commit in a transaction of its own (:func:`wake_if_ready`),
  and the beat's sweep (:func:`ready_parents`) is the backstop for a process that dies
  in between: a waiting parent whose condition holds is woken within one interval.

A waited-for child that no longer exists (deleted once terminal) counts as terminal, so
a deletion cannot strand its parent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.store import db, outbox
from app.store.representation import TASK_COLUMNS

MODES = ("all", "any")
_TERMINAL = "('completed', 'failed', 'cancelled')"


def spawn_key(step: int, index: int) -> str:
    """The key of the ``index``-th ``ctx.spawn`` call of step ``step`` (0-based)."""
    return f"{step}:{index}"


# Whether parent ``p``'s wait is over: "all": no waited-for child is still running;
# "any": one of them is terminal (or gone). The one predicate of the checkpoint, the
# child's terminal transition and the sweep.
READY = (
    "(CASE WHEN p.waiting_for->>'mode' = 'any' THEN EXISTS ("
    "  SELECT 1 FROM jsonb_array_elements_text(p.waiting_for->'ids') AS w(id) "
    "  LEFT JOIN tasks c ON c.id = w.id AND c.parent_id = p.id "
    f"  WHERE c.id IS NULL OR c.status IN {_TERMINAL}) "
    "ELSE NOT EXISTS ("
    "  SELECT 1 FROM jsonb_array_elements_text(p.waiting_for->'ids') AS w(id) "
    "  JOIN tasks c ON c.id = w.id AND c.parent_id = p.id "
    f"  WHERE c.status NOT IN {_TERMINAL}) END)"
)

_LOCK_WAKE = sa.text("SELECT pg_advisory_xact_lock(hashtextextended('outlast.wake:' || :p, 0))")


# --- spawning ---------------------------------------------------------------------------


def lock_parent_for_spawn(conn: Connection, parent_id: str, token: str) -> RowMapping | None:
    """The parent (``id``, ``tenant_id``) if this step still holds its lease, share-locked
    until the spawn commits: a cancel of the parent waits for it, and then cascades to
    the new child too. ``None``: cancelled or lease lost (nothing may be spawned)."""
    return (
        conn.execute(
            sa.text(
                "SELECT id, tenant_id FROM tasks WHERE id = :id AND lease_token = :token "
                "AND status = 'working' FOR SHARE"
            ),
            {"id": parent_id, "token": token},
        )
        .mappings()
        .one_or_none()
    )


def find_spawned(conn: Connection, parent_id: str, key: str) -> RowMapping | None:
    """The child that the parent's spawn call ``key`` created, if any."""
    return (
        conn.execute(
            sa.text(
                "SELECT id, agent, input, metadata FROM tasks "
                "WHERE parent_id = :parent AND spawn_key = :key"
            ),
            {"parent": parent_id, "key": key},
        )
        .mappings()
        .one_or_none()
    )


# --- waiting ----------------------------------------------------------------------------


def not_children(conn: Connection, parent_id: str, ids: Sequence[str]) -> list[str]:
    """Those of ``ids`` that are not children of ``parent_id``."""
    found = set(
        conn.execute(
            sa.text("SELECT id FROM tasks WHERE parent_id = :parent AND id = ANY(:ids)"),
            {"parent": parent_id, "ids": list(ids)},
        ).scalars()
    )
    return [i for i in ids if i not in found]


def wait(conn: Connection, task_id: str, ids: Sequence[str], mode: str) -> bool:
    """In the checkpoint transaction of a step that returned ``ctx.wait_for``, after
    :func:`app.store.lifecycle.commit_step` (``dispatch=False``): record the wait, or,
    when the condition already holds, mark the next step queued (``True``: the caller
    adds its outbox row)."""
    conn.execute(_LOCK_WAKE, {"p": task_id})
    waiting = json.dumps({"ids": list(ids), "mode": mode})
    ready = conn.execute(
        sa.text(
            f"SELECT {READY} FROM (SELECT CAST(:id AS text) AS id, "
            "CAST(:waiting AS jsonb) AS waiting_for) AS p"
        ),
        {"id": task_id, "waiting": waiting},
    ).scalar()
    conn.execute(
        sa.text(
            "UPDATE tasks SET waiting_for = CASE WHEN :ready THEN NULL "
            "ELSE CAST(:waiting AS jsonb) END, "
            "dispatched_at = CASE WHEN :ready THEN now() ELSE NULL END "
            "WHERE id = :id AND status = 'working' AND lease_token IS NULL"
        ),
        {"id": task_id, "ready": bool(ready), "waiting": waiting},
    )
    return bool(ready)


def _wake(conn: Connection, parent_id: str) -> RowMapping | None:
    """Clear a ready parent's wait and queue its next step (outbox row); guarded, so a
    second waker (another child, the sweep) changes nothing."""
    row = (
        conn.execute(
            sa.text(
                "UPDATE tasks p SET waiting_for = NULL, dispatched_at = now(), "
                "updated_at = now() WHERE p.id = :id AND p.status = 'working' "
                f"AND p.waiting_for IS NOT NULL AND {READY} RETURNING p.id, p.step"
            ),
            {"id": parent_id},
        )
        .mappings()
        .one_or_none()
    )
    if row is not None:
        outbox.add_step(conn, parent_id, row["step"])
    return row


def on_child_terminal(conn: Connection, parent_id: str) -> None:
    """A child of ``parent_id`` just became terminal in this transaction: wake the
    parent if it waits and its condition now holds (see the module docstring)."""
    status = conn.execute(
        sa.text("SELECT status::text FROM tasks WHERE id = :id"), {"id": parent_id}
    ).scalar()
    if status != "working":
        # Only a working parent can wait for children. This also skips a parent that
        # this very transaction is cancelling (the cascade: it then never takes the
        # advisory lock below, so it cannot deadlock with a child cancelled directly).
        return
    conn.execute(_LOCK_WAKE, {"p": parent_id})
    locked = conn.execute(
        # NO KEY UPDATE, the lock an UPDATE of the row takes: FOR UPDATE would also
        # conflict with the KEY SHARE locks that other children's own updates take on
        # their parent (the foreign key check).
        sa.text("SELECT id FROM tasks WHERE id = :id FOR NO KEY UPDATE SKIP LOCKED"),
        {"id": parent_id},
    ).scalar()
    if locked is None:
        db.after_commit(conn, wake_if_ready, parent_id)
        return
    _wake(conn, parent_id)


def wake_if_ready(parent_id: str) -> bool:
    """Wake ``parent_id`` if it waits and its condition holds, in a transaction of its
    own (after a child's commit found the parent row busy, and the sweep)."""
    with db.transaction() as conn:
        conn.execute(_LOCK_WAKE, {"p": parent_id})
        return _wake(conn, parent_id) is not None


def ready_parents(limit: int) -> list[str]:
    """Waiting parents whose condition holds (the sweep's backstop), oldest wait first."""
    with db.engine().connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT p.id FROM tasks p WHERE p.waiting_for IS NOT NULL "
                    f"AND p.status = 'working' AND {READY} ORDER BY p.updated_at LIMIT :limit"
                ),
                {"limit": limit},
            ).scalars()
        )


# --- reading and cancelling -------------------------------------------------------------


def active_children(conn: Connection, parent_id: str) -> list[str]:
    """Ids of the parent's children that are not terminal, in spawn order."""
    return list(
        conn.execute(
            sa.text(
                "SELECT id FROM tasks WHERE parent_id = :parent "
                f"AND status NOT IN {_TERMINAL} ORDER BY created_at, id"
            ),
            {"parent": parent_id},
        ).scalars()
    )


def by_ids(conn: Connection, parent_id: str, ids: Sequence[str]) -> list[RowMapping | None]:
    """The rows of the parent's children ``ids``, in that order (``None``: not a child,
    or deleted)."""
    rows = {
        r["id"]: r
        for r in conn.execute(
            sa.text(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE parent_id = :parent AND id = ANY(:ids)"
            ),
            {"parent": parent_id, "ids": list(ids)},
        ).mappings()
    }
    return [rows.get(i) for i in ids]


def page(
    conn: Connection,
    parent_id: str,
    *,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> list[RowMapping]:
    """Up to ``limit`` children of ``parent_id`` in spawn order, after the (created_at,
    id) of a cursor (index ``tasks_parent_created``)."""
    params: dict[str, Any] = {"parent": parent_id, "limit": limit}
    where = "parent_id = :parent"
    if after is not None:
        params["c_at"], params["c_id"] = after
        where += " AND (created_at, id) > (:c_at, :c_id)"
    return list(
        conn.execute(
            sa.text(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE {where} "
                "ORDER BY created_at, id LIMIT :limit"
            ),
            params,
        ).mappings()
    )
