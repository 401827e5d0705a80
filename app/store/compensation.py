"""What a task owes in undos, and the undo log (V2.md section 5), as SQL.

An undo is a row of ``tool_calls`` with ``kind = 'compensation'``, logged at the
``(step_index, call_index)`` of the call it undoes, with key ``<original key>-undo``.
A completed call (``kind = 'call'``) whose row names a ``compensate`` tool is **owed**
until its undo row is finished: ``completed``, or ``failed`` with ``error.final`` (a
4xx answer, an error that is not transient, no such tool, or its tries used up). An
undo row that is ``started`` (a worker died in it) or ``failed`` without ``final`` (a
transient error) is made again with the same key.

What is owed is a fact of the log alone (the tool named when the call was made), so the
store decides it without the engine's registry; :mod:`app.store.lifecycle` enters
``compensating`` only when something is, and :mod:`app.engine.compensation` runs the
undos newest first. ``tasks.compensation``'s counters are recomputed from the log after
every undo (:func:`refresh`): ``total`` is what was owed at entry plus a call in flight
at the cancel that completed after it.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

KIND_CALL = "call"
KIND_UNDO = "compensation"
UNDO_SUFFIX = "-undo"

# An undo row that no longer needs making (``u`` is the compensation row).
_FINISHED_UNDO = "(u.status = 'completed' OR (u.status = 'failed' AND u.error->>'final' = 'true'))"


def _owed(task: str) -> str:
    """Rows ``c`` of task ``task`` (an SQL expression) that still need an undo."""
    return (
        f"FROM tool_calls c WHERE c.task_id = {task} AND c.kind = 'call' "
        "AND c.status = 'completed' AND c.compensate IS NOT NULL AND NOT EXISTS ("
        "SELECT 1 FROM tool_calls u WHERE u.task_id = c.task_id "
        "AND u.step_index = c.step_index AND u.call_index = c.call_index "
        f"AND u.kind = 'compensation' AND {_FINISHED_UNDO})"
    )


# For lifecycle's guarded UPDATE of ``tasks`` (its row is ``tasks``).
OWED_SQL = f"SELECT 1 {_owed('tasks.id')}"
OWED_COUNT_SQL = f"SELECT count(*) {_owed('tasks.id')}"

_UNDO_COLUMNS = (
    "task_id, step_index, call_index, name, idempotency_key, status, args, output, "
    "error, attempts, started_at, finished_at"
)


def undo_key(original_key: str) -> str:
    """The idempotency key of the undo of the call made with ``original_key``."""
    return original_key + UNDO_SUFFIX


def next_owed(conn: Connection, task_id: str) -> RowMapping | None:
    """The newest call still owed an undo (by step, then call index), with its undo
    row's ``undo_attempts`` (``None`` before its first try)."""
    return (
        conn.execute(
            sa.text(
                "SELECT c.step_index, c.call_index, c.name, c.idempotency_key, c.args, "
                "c.output, c.compensate, "
                "(SELECT w.attempts FROM tool_calls w WHERE w.task_id = c.task_id "
                " AND w.step_index = c.step_index AND w.call_index = c.call_index "
                " AND w.kind = 'compensation') AS undo_attempts "
                f"{_owed(':task_id')} ORDER BY c.step_index DESC, c.call_index DESC LIMIT 1"
            ),
            {"task_id": task_id},
        )
        .mappings()
        .one_or_none()
    )


def calls_in_flight(conn: Connection, task_id: str, settle_seconds: float) -> bool:
    """A call to a tool with a compensation started less than ``settle_seconds`` ago
    and not finished: a step still running when its task was cancelled (or timed out)
    may yet complete it, and then it is owed too. Undos wait for it, newest first; a
    call started longer ago is in doubt (its worker died) and is not undone."""
    return (
        conn.execute(
            sa.text(
                "SELECT 1 FROM tool_calls WHERE task_id = :task_id AND kind = 'call' "
                "AND status = 'started' AND compensate IS NOT NULL "
                "AND started_at > now() - make_interval(secs => :settle) LIMIT 1"
            ),
            {"task_id": task_id, "settle": settle_seconds},
        ).first()
        is not None
    )


def begin_undo(
    conn: Connection,
    *,
    task_id: str,
    step: int,
    call_index: int,
    name: str,
    key: str,
    args: Any,
    lease_token: str,
) -> RowMapping | None:
    """Log the undo as ``started`` before it is made (``attempts`` + 1 on a repeat),
    fenced on the compensating task's undo lease (held and not expired). ``None``: the
    lease is lost, or the undo finished meanwhile."""
    return (
        conn.execute(
            sa.text(
                "INSERT INTO tool_calls (task_id, step_index, call_index, kind, name, "
                "idempotency_key, status, args) "
                "SELECT t.id, :step, :call, 'compensation', :name, :key, 'started', "
                "CAST(:args AS jsonb) FROM tasks t WHERE t.id = :task_id "
                "AND t.lease_token = :token AND t.status = 'compensating' "
                "AND t.lease_expires_at > now() "
                "ON CONFLICT (task_id, step_index, call_index, kind) DO UPDATE "
                "SET status = 'started', attempts = tool_calls.attempts + 1, error = NULL, "
                "started_at = now(), finished_at = NULL "
                "WHERE tool_calls.status = 'started' OR (tool_calls.status = 'failed' "
                "AND (tool_calls.error->>'final') IS DISTINCT FROM 'true') "
                f"RETURNING {_UNDO_COLUMNS}"
            ),
            {
                "task_id": task_id,
                "step": step,
                "call": call_index,
                "name": name,
                "key": key,
                "args": json.dumps(args),
                "token": lease_token,
            },
        )
        .mappings()
        .one_or_none()
    )


def fail_undo(
    conn: Connection,
    *,
    task_id: str,
    step: int,
    call_index: int,
    name: str,
    key: str,
    error: dict[str, Any],
    final: bool,
) -> None:
    """Record that an undo raised; ``final`` ends it (counted in ``failed``), otherwise
    it is made again after a backoff. Writes the row if the undo never started (no
    such tool, no tries left)."""
    conn.execute(
        sa.text(
            "INSERT INTO tool_calls (task_id, step_index, call_index, kind, name, "
            "idempotency_key, status, args, error, finished_at) "
            "VALUES (:task_id, :step, :call, 'compensation', :name, :key, 'failed', "
            "'{}'::jsonb, CAST(:error AS jsonb), now()) "
            "ON CONFLICT (task_id, step_index, call_index, kind) DO UPDATE "
            "SET status = 'failed', error = EXCLUDED.error, finished_at = now() "
            "WHERE tool_calls.status <> 'completed'"
        ),
        {
            "task_id": task_id,
            "step": step,
            "call": call_index,
            "name": name,
            "key": key,
            "error": json.dumps({**error, "final": final}),
        },
    )


def refresh(conn: Connection, task_id: str, token: str) -> Any:
    """Recompute ``tasks.compensation``'s ``done``, ``failed`` and ``total`` from the
    log (fenced on the undo lease); returns it, or ``None`` when the lease is lost.
    Not a status change: the status stays ``compensating``."""
    return conn.execute(
        sa.text(
            "WITH n AS (SELECT "
            "count(*) FILTER (WHERE u.status = 'completed') AS done, "
            "count(*) FILTER (WHERE u.status = 'failed' AND u.error->>'final' = 'true') "
            "AS failed FROM tool_calls u WHERE u.task_id = :task_id "
            "AND u.kind = 'compensation'), "
            f"o AS (SELECT count(*) AS owed {_owed(':task_id')}) "
            "UPDATE tasks SET updated_at = now(), compensation = compensation "
            "|| jsonb_build_object('total', n.done + n.failed + o.owed, 'done', n.done, "
            "'failed', n.failed) FROM n, o WHERE tasks.id = :task_id "
            "AND tasks.status = 'compensating' AND tasks.lease_token = :token "
            "RETURNING tasks.compensation"
        ),
        {"task_id": task_id, "token": token},
    ).scalar()
