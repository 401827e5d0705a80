"""The tool-call log (DESIGN.md, mechanism 4): one row per ``(task, step, call)``.

Before a call the step runner looks the row up: ``completed`` means the call already
happened and its stored output is returned instead; ``started`` (or ``failed``) means it
may or may not have happened, so it is made again with the same key. A ``started`` row
is written, fenced on the step's lease, before the call is made: once a task is
cancelled (or its lease is lost) no new call can start.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.store import budgets

STARTED = "started"
COMPLETED = "completed"
FAILED = "failed"

_COLUMNS = (
    "task_id, step_index, call_index, name, idempotency_key, status, args, args_hash, output, "
    "error, attempts, started_at, finished_at, kind, compensate"
)
# ``kind`` (migration 0005): a call the agent made, or the undo of one (V2.md 5), logged
# at the undone call's index (app.store.compensation).
CALL = "call"


def args_hash(name: str, args: Any) -> str:
    """A hash of a call's tool name and full arguments (the log may keep only a summary
    of the arguments): a re-run that asks the same call index with other arguments is
    told apart from a replay. Canonical JSON (sorted keys); anything not JSON by its
    ``repr``."""
    canonical = json.dumps(
        [name, args], sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def storable(value: Any) -> Any:
    """``value`` as PostgreSQL's jsonb accepts it: NUL characters removed from strings
    (and keys), NaN and infinities replaced by ``null``, lone surrogates replaced. A
    tool's output goes through this before it is logged and returned, so a replay hands
    the step exactly what the first run saw."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            (_clean_text(k) if isinstance(k, str) else k): storable(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def _clean_text(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: jsonb refuses their escapes
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def get(
    conn: Connection, task_id: str, step: int, call_index: int, kind: str = CALL
) -> RowMapping | None:
    """The log row of one call (or its undo), or ``None`` when it was never started."""
    return (
        conn.execute(
            sa.text(
                f"SELECT {_COLUMNS} FROM tool_calls WHERE task_id = :task_id "
                "AND step_index = :step AND call_index = :call AND kind = :kind"
            ),
            {"task_id": task_id, "step": step, "call": call_index, "kind": kind},
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
    args_hash: str | None = None,
    compensate: str | None = None,
) -> RowMapping | None:
    """Record that the call is about to be made (``started``; ``attempts`` + 1 on a
    repeat). Fenced on the lease, checked here right before the call is made: ``None``
    when the task is no longer ``working`` under ``lease_token`` (cancelled, failed,
    reaped), the lease has expired (a worker paused past it, not yet reaped), the call
    completed meanwhile, or it was logged with other arguments (``args_hash``).
    ``compensate``: the tool that undoes this one, as its tool declares it now (V2.md 5;
    once the call completes, the task owes its undo)."""
    return (
        conn.execute(
            sa.text(
                "INSERT INTO tool_calls (task_id, step_index, call_index, name, "
                "idempotency_key, status, args, args_hash, compensate) "
                "SELECT t.id, :step, :call, :name, :key, 'started', CAST(:args AS jsonb), "
                ":args_hash, :compensate FROM tasks t WHERE t.id = :task_id AND t.lease_token = :token "
                "AND t.status = 'working' AND t.lease_expires_at > now() "
                "ON CONFLICT (task_id, step_index, call_index, kind) DO UPDATE "
                "SET status = 'started', attempts = tool_calls.attempts + 1, error = NULL, "
                "started_at = now(), finished_at = NULL, "
                "args_hash = COALESCE(tool_calls.args_hash, EXCLUDED.args_hash) "
                "WHERE tool_calls.status <> 'completed' AND (tool_calls.args_hash IS NULL "
                "OR EXCLUDED.args_hash IS NULL OR tool_calls.args_hash = EXCLUDED.args_hash) "
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
                "args_hash": args_hash,
                "compensate": compensate,
            },
        )
        .mappings()
        .one_or_none()
    )


def complete(
    conn: Connection, task_id: str, step: int, call_index: int, output: Any, kind: str = CALL
) -> dict[str, int] | None:
    """Store the call's output and count the call in ``tasks.usage`` (V2.md section 1)
    in the same statement; returns the task's usage after it.

    Give ``output`` to :func:`storable` first. Not fenced: the side effect happened
    whatever became of the lease, and a later run of this step must replay rather than
    repeat it. The first writer wins: a call already completed (by a newer execution
    while this one's worker was paused) is left alone and not counted again (``None``):
    usage counts each completed call once. A terminal task's usage is left as it is
    (``None`` too).
    """
    as_model_call = budgets.added(budgets.EMPTY_USAGE, budgets.MODEL_TOOL, output)
    is_model = f"done.name = '{budgets.MODEL_TOOL}'"
    return conn.execute(
        sa.text(
            "WITH done AS ("
            "UPDATE tool_calls SET status = 'completed', output = CAST(:output AS jsonb), "
            "error = NULL, finished_at = now() "
            "WHERE task_id = :task_id AND step_index = :step AND call_index = :call "
            "AND kind = :kind AND status <> 'completed' RETURNING name) "
            "UPDATE tasks SET usage = jsonb_build_object("
            f"'model_calls', {_used('model_calls')} + CASE WHEN {is_model} THEN 1 ELSE 0 END, "
            f"'tool_calls', {_used('tool_calls')} + CASE WHEN {is_model} THEN 0 ELSE 1 END, "
            f"'input_tokens', {_used('input_tokens')} + CASE WHEN {is_model} THEN :input_tokens "
            "ELSE 0 END, "
            f"'output_tokens', {_used('output_tokens')} + CASE WHEN {is_model} "
            "THEN :output_tokens ELSE 0 END) "
            # A terminal task never changes again: a call that completes after a cancel
            # is logged (a re-run must not repeat it) but not added to the final usage.
            "FROM done WHERE tasks.id = :task_id "
            "AND tasks.status NOT IN ('completed', 'failed', 'cancelled') "
            "RETURNING tasks.usage"
        ),
        {
            "task_id": task_id,
            "step": step,
            "call": call_index,
            "output": json.dumps(output),
            "kind": kind,
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
            "AND kind = 'call' AND status <> 'completed'"
        ),
        {"task_id": task_id, "step": step, "call": call_index, "error": json.dumps(error)},
    )


def for_task(conn: Connection, task_id: str) -> list[RowMapping]:
    """Every logged call of a task, in order, an undo right after the call it undoes
    (``GET /v1/tasks/{id}/steps``)."""
    return list(
        conn.execute(
            sa.text(
                f"SELECT {_COLUMNS} FROM tool_calls WHERE task_id = :task_id "
                "ORDER BY step_index, call_index, kind"
            ),
            {"task_id": task_id},
        ).mappings()
    )
