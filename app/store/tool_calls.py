"""The tool-call log (DESIGN.md, mechanism 4): one row per ``(task, step, call)``.

Before a call the step runner looks the row up: ``completed`` means the call already
happened and its stored output is returned instead; ``started`` (or ``failed``) means it
may or may not have happened, so it is made again with the same key. A ``started`` row
is written, fenced on the step's lease, before the call is made: once a task is
cancelled (or its lease is lost) no new call can start.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.store import budgets

STARTED = "started"
COMPLETED = "completed"
FAILED = "failed"

_COLUMNS = (
    "task_id, step_index, call_index, name, idempotency_key, status, args, output, error, "
    "attempts, started_at, finished_at"
)


def get(conn: Connection, task_id: str, step: int, call_index: int) -> RowMapping | None:
    """The log row of one call, or ``None`` when it was never started."""
    return (
        conn.execute(
            sa.text(
                f"SELECT {_COLUMNS} FROM tool_calls "
                "WHERE task_id = :task_id AND step_index = :step AND call_index = :call"
            ),
            {"task_id": task_id, "step": step, "call": call_index},
        )
        .mappings()
        .one_or_none()
    )


def begin(
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
    """Record that the call is about to be made (``started``; ``attempts`` + 1 on a
    repeat). Fenced on the lease: ``None`` when the task is no longer ``working`` under
    ``lease_token`` (cancelled, failed, reaped) or the call completed meanwhile."""
    return (
        conn.execute(
            sa.text(
                "INSERT INTO tool_calls (task_id, step_index, call_index, name, "
                "idempotency_key, status, args) "
                "SELECT t.id, :step, :call, :name, :key, 'started', CAST(:args AS jsonb) "
                "FROM tasks t WHERE t.id = :task_id AND t.lease_token = :token "
                "AND t.status = 'working' "
                "ON CONFLICT (task_id, step_index, call_index) DO UPDATE "
                "SET status = 'started', attempts = tool_calls.attempts + 1, error = NULL, "
                "started_at = now(), finished_at = NULL "
                "WHERE tool_calls.status <> 'completed' "
                f"RETURNING {_COLUMNS}"
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


def complete(
    conn: Connection, task_id: str, step: int, call_index: int, output: Any
) -> dict[str, int] | None:
    """Store the call's output and count the call in ``tasks.usage`` (V2.md section 1)
    in the same statement; returns the task's usage after it.

    Not fenced: the side effect happened whatever became of the lease, and a later run
    of this step must replay rather than repeat it. A call already completed is left
    alone and not counted again (``None``): usage counts each completed call once.
    """
    as_model_call = budgets.added(budgets.EMPTY_USAGE, budgets.MODEL_TOOL, output)
    is_model = f"done.name = '{budgets.MODEL_TOOL}'"
    return conn.execute(
        sa.text(
            "WITH done AS ("
            "UPDATE tool_calls SET status = 'completed', output = CAST(:output AS jsonb), "
            "error = NULL, finished_at = now() "
            "WHERE task_id = :task_id AND step_index = :step AND call_index = :call "
            "AND status <> 'completed' RETURNING name) "
            "UPDATE tasks SET usage = jsonb_build_object("
            f"'model_calls', {_used('model_calls')} + CASE WHEN {is_model} THEN 1 ELSE 0 END, "
            f"'tool_calls', {_used('tool_calls')} + CASE WHEN {is_model} THEN 0 ELSE 1 END, "
            f"'input_tokens', {_used('input_tokens')} + CASE WHEN {is_model} THEN :input_tokens "
            "ELSE 0 END, "
            f"'output_tokens', {_used('output_tokens')} + CASE WHEN {is_model} "
            "THEN :output_tokens ELSE 0 END) "
            "FROM done WHERE tasks.id = :task_id RETURNING tasks.usage"
        ),
        {
            "task_id": task_id,
            "step": step,
            "call": call_index,
            "output": json.dumps(output),
            "input_tokens": as_model_call["input_tokens"],
            "output_tokens": as_model_call["output_tokens"],
        },
    ).scalar()


def _used(key: str) -> str:
    return f"COALESCE((tasks.usage->>'{key}')::bigint, 0)"


def fail(conn: Connection, task_id: str, step: int, call_index: int, error: dict[str, Any]) -> None:
    """Record that the call raised; a re-run of the step makes it again with the same key."""
    conn.execute(
        sa.text(
            "UPDATE tool_calls SET status = 'failed', error = CAST(:error AS jsonb), "
            "finished_at = now() "
            "WHERE task_id = :task_id AND step_index = :step AND call_index = :call "
            "AND status <> 'completed'"
        ),
        {"task_id": task_id, "step": step, "call": call_index, "error": json.dumps(error)},
    )


def for_task(conn: Connection, task_id: str) -> list[RowMapping]:
    """Every logged call of a task, in order (``GET /v1/tasks/{id}/steps``)."""
    return list(
        conn.execute(
            sa.text(
                f"SELECT {_COLUMNS} FROM tool_calls WHERE task_id = :task_id "
                "ORDER BY step_index, call_index"
            ),
            {"task_id": task_id},
        ).mappings()
    )
