"""The one place that writes a task's status (DESIGN.md, mechanism 1).

Every function here is a single conditional ``UPDATE tasks … WHERE id = :id AND status
IN (:allowed) [AND fence] RETURNING …`` plus the event it emits, on the caller's
connection, so the change and its event commit together. Terminal states are in no
``allowed`` set: once a task is completed, failed or cancelled nothing here matches it
again, whatever races happen. A function returns the task row after the change, or
``None`` when the guard did not match (the caller decides whether that is an error).

Each change also sends ``NOTIFY outlast_task, '<task id>'``; PostgreSQL delivers it only
when the transaction commits, which is what the long poll and the SSE stream wait on.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection, RowMapping

from app.store import budgets, children, db, deliveries, ids, outbox
from app.store import compensation as undo_log
from app.store.representation import TASK_COLUMNS, event_task_json

NOTIFY_CHANNEL = "outlast_task"


class Status(enum.StrEnum):
    """Mirrors the SQL enum ``task_status`` (migrations 0001 and 0004)."""

    PENDING = "pending"
    WORKING = "working"
    INPUT_REQUIRED = "input_required"
    COMPENSATING = "compensating"  # V2.md 2: undoing completed calls, then failed/cancelled
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
# What a failure or a cancel may still change. COMPENSATING is neither terminal nor
# here: a task undoing its calls only leaves for the state it was headed to
# (finish_compensation), whatever a cancel, a deadline or the reaper says meanwhile.
ACTIVE = frozenset({Status.PENDING, Status.WORKING, Status.INPUT_REQUIRED})


class EventType(enum.StrEnum):
    """Every event type a task's log may hold (API.md, "Events")."""

    CREATED = "task.created"
    STARTED = "task.started"
    STEP_COMPLETED = "task.step.completed"
    PROGRESS = "task.progress"
    INPUT_REQUIRED = "task.input_required"
    RESUMED = "task.resumed"
    RETRYING = "task.retrying"
    COMPLETED = "task.completed"
    FAILED = "task.failed"
    CANCELLED = "task.cancelled"
    MIGRATED = "task.migrated"  # V2.md 7: data.from_version, data.to_version
    COMPENSATING = "task.compensating"  # V2.md 2: once per task, on entry to compensating


# The terminal event of each terminal status: the last event a task ever gets.
TERMINAL_EVENTS = {
    EventType.COMPLETED: Status.COMPLETED,
    EventType.FAILED: Status.FAILED,
    EventType.CANCELLED: Status.CANCELLED,
}

# Events that are also POSTed to the task's webhook_url.
WEBHOOK_EVENT_TYPES = frozenset(
    {EventType.INPUT_REQUIRED, EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED}
)


class ErrorType(enum.StrEnum):
    AGENT_ERROR = "agent_error"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    INVALID_OUTPUT = "invalid_output"
    BUDGET_EXCEEDED = "budget_exceeded"


# Called with (event type, task row) after the transaction that wrote the event commits.
EventListener = Callable[[EventType, Mapping[str, Any]], None]
_listeners: list[EventListener] = []


def subscribe(listener: EventListener) -> None:
    """Have ``listener`` told of every event once its transaction commits (metrics)."""
    if listener not in _listeners:
        _listeners.append(listener)


def _announce(event_type: EventType, task: Mapping[str, Any]) -> None:
    for listener in _listeners:
        listener(event_type, task)


def _statuses(statuses: frozenset[Status] | set[Status]) -> list[str]:
    return sorted(s.value for s in statuses)


def append_event(
    conn: Connection,
    task: Mapping[str, Any],
    event_type: EventType,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the event whose seq the task row already carries (``last_seq``); its
    ``data`` is ``{"task": …}`` plus ``extra``.

    Creates a webhook delivery in the same transaction when the event is one that
    webhooks carry and the task has a ``webhook_url``.
    """
    sql, params, event_ids = _events_insert([(task, event_type, extra)])
    row = conn.execute(db.text(sql), params).mappings().one()
    _after_event(conn, task, event_type, event_ids[0])
    return {k: v for k, v in row.items() if k != "notified"}


_EVENT_COLUMNS = "task_id, seq, id, type, data, created_at"


def _events_insert(
    events: list[tuple[Mapping[str, Any], EventType, Mapping[str, Any] | None]],
) -> tuple[str, dict[str, Any], list[str]]:
    """One ``INSERT INTO events`` of ``(task row, type, extra)`` rows, each at the seq its
    row carries: the SQL, its parameters (``ev<i>_…``, no clash with a statement it
    rides along with) and the new events' ids. The ``NOTIFY`` rides on it too (one round
    trip fewer per event); PostgreSQL still delivers it only when the transaction
    commits, and evaluates it even when the ``INSERT`` is a ``WITH`` query nobody reads
    (data-modifying ``WITH`` queries always run to completion)."""
    values, event_ids = [], []
    params: dict[str, Any] = {"ev_channel": NOTIFY_CHANNEL}
    for i, (task, event_type, extra) in enumerate(events):
        event_id = ids.new_id("evt")
        event_ids.append(event_id)
        values.append(
            f"(:ev{i}_task, :ev{i}_seq, :ev{i}_id, :ev{i}_type, CAST(:ev{i}_data AS jsonb), :ev{i}_at)"
        )
        params.update(
            {
                f"ev{i}_task": task["id"],
                f"ev{i}_seq": task["last_seq"],
                f"ev{i}_id": event_id,
                f"ev{i}_type": str(event_type),
                f"ev{i}_data": json.dumps({**(extra or {}), "task": event_task_json(task)}),
                f"ev{i}_at": task["updated_at"],
            }
        )
    sql = (
        f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES {', '.join(values)} "
        f"RETURNING {_EVENT_COLUMNS}, pg_notify(:ev_channel, task_id) AS notified"
    )
    return sql, params, event_ids


def _after_event(
    conn: Connection, task: Mapping[str, Any], event_type: EventType, event_id: str
) -> None:
    """What an event brings about in its transaction: the webhook delivery of an event
    webhooks carry, the wake-up of a parent waiting for this child, the listeners told
    once it commits."""
    if event_type in WEBHOOK_EVENT_TYPES and task.get("webhook_url"):
        delivery = deliveries.insert(conn, task, event_id, task["last_seq"], event_type)
        # Sent right after the commit; the beat's webhook sweep covers a lost message.
        outbox.add_delivery(conn, delivery["id"])
    if event_type in TERMINAL_EVENTS and task.get("parent_id"):
        # Every terminal transition writes its event here: the parent waiting for this
        # child is woken in the same transaction (V2.md 6; app.store.children).
        children.on_child_terminal(conn, task["parent_id"])
    db.after_commit(conn, _announce, event_type, task)


def _update(
    conn: Connection,
    task_id: str,
    set_sql: str,
    *,
    allowed: frozenset[Status] | set[Status],
    where_sql: str = "",
    params: Mapping[str, Any] | None = None,
    events: int = 1,
    also_sql: str = "",
) -> RowMapping | None:
    """``UPDATE tasks SET <set_sql>, updated_at, last_seq WHERE id AND status IN allowed``.

    ``also_sql``: a data-modifying statement that reads the updated row from ``task``
    (``INSERT … SELECT … FROM task``), run only when the guard matched, in the same
    round trip (a ``WITH`` query)."""
    update = (
        f"UPDATE tasks SET {set_sql}, updated_at = now(), last_seq = last_seq + {events} "
        "WHERE id = :task_id AND status = ANY(CAST(:allowed AS task_status[])) "
        f"{where_sql} RETURNING {TASK_COLUMNS}"
    )
    sql = (
        f"WITH task AS ({update}), also AS ({also_sql}) SELECT * FROM task" if also_sql else update
    )
    bound = {"task_id": task_id, "allowed": _statuses(allowed), **(params or {})}
    return conn.execute(db.text(sql), bound).mappings().one_or_none()


# --- creation --------------------------------------------------------------------------


def create(
    conn: Connection,
    *,
    tenant_id: str,
    agent: str,
    input: Mapping[str, Any],
    metadata: Mapping[str, Any],
    webhook_url: str | None,
    timeout_seconds: int | None,
    idempotency_key: str | None,
    task_id: str | None = None,
    budget: Mapping[str, Any] | None = None,
    agent_version: str = "1",
    parent_id: str | None = None,
    spawn_key: str | None = None,
    dispatch: bool = False,
    also: Sequence[str] = (),
    also_params: Mapping[str, Any] | None = None,
) -> RowMapping:
    """Insert a ``pending`` task pinned to ``agent_version`` and its ``task.created``
    event (seq 1); a child task (V2.md 6) has its parent's id and spawn call's key.

    ``dispatch``: also queue step 0's message (its outbox row), in the round trip that
    writes the event, with ``also``/``also_params`` (see :func:`outbox.add`)."""
    row = (
        conn.execute(
            db.text(
                "INSERT INTO tasks (id, tenant_id, agent, agent_version, status, input, "
                "metadata, webhook_url, timeout_seconds, deadline_at, idempotency_key, "
                "last_seq, dispatched_at, budget, parent_id, spawn_key) "
                "VALUES (:id, :tenant_id, :agent, :agent_version, 'pending', CAST(:input AS jsonb), "
                "CAST(:metadata AS jsonb), :webhook_url, :timeout, "
                "CASE WHEN CAST(:timeout AS integer) IS NULL THEN NULL "
                "ELSE now() + make_interval(secs => CAST(:timeout AS integer)) END, "
                f":idem, 1, now(), CAST(:budget AS jsonb), :parent_id, :spawn_key) "
                f"RETURNING {TASK_COLUMNS}"
            ),
            {
                "id": task_id or ids.new_id("tsk"),
                "tenant_id": tenant_id,
                "agent": agent,
                "agent_version": agent_version,
                "input": json.dumps(input),
                "metadata": json.dumps(metadata),
                "webhook_url": webhook_url,
                "timeout": timeout_seconds,
                "idem": idempotency_key,
                "budget": json.dumps(budget) if budget is not None else None,
                "parent_id": parent_id,
                "spawn_key": spawn_key,
            },
        )
        .mappings()
        .one()
    )
    if not dispatch:
        append_event(conn, row, EventType.CREATED)
        return row
    sql, params, (event_id,) = _events_insert([(row, EventType.CREATED, None)])
    outbox.add_step(
        conn, row["id"], 0, also=[sql, *also], also_params={**params, **(also_params or {})}
    )
    _after_event(conn, row, EventType.CREATED, event_id)
    return row


# --- the worker's side: leases and checkpoints --------------------------------------------


def acquire_lease(
    conn: Connection,
    task_id: str,
    step: int,
    token: str,
    lease_seconds: float,
    previous_token: str | None = None,
    *,
    delete_outbox: Sequence[int] = (),
) -> RowMapping | None:
    """Take the lease on step ``step``; ``pending`` becomes ``working`` (``task.started``).

    Matches only when the task is runnable, at exactly this step, not sleeping, and no
    lease is held: a duplicate or stale message gets ``None`` and must drop its work.
    An expired lease is not taken over here; the reaper clears it (attempt + 1) first.

    ``previous_token``: the lease this same message took before a database outage
    interrupted its step (the Celery retry of that message). It is taken over, under the
    new ``token``, as long as the reaper has not cleared it: an outage costs no attempt.

    The row carries ``previous_state``, the previous step's checkpoint (``None`` before
    step 0; a checkpoint never changes once written, except by a migration under the
    lease). ``delete_outbox``: outbox rows this process sent (``outbox.sent_rows``),
    deleted in the same round trip, whether or not the lease is taken.
    """
    update = (
        "UPDATE tasks SET status = 'working', lease_token = :token, "
        "lease_expires_at = now() + make_interval(secs => :lease), "
        "started_at = COALESCE(started_at, now()), updated_at = now(), "
        "last_seq = last_seq + CASE WHEN status = 'pending' THEN 1 ELSE 0 END "
        "WHERE id = :task_id AND step = :step AND status IN ('pending', 'working') "
        "AND (lease_token IS NULL OR lease_token = :previous) AND wake_at IS NULL "
        # A parent waiting for its children runs nothing until they wake it.
        "AND waiting_for IS NULL "
        f"RETURNING {TASK_COLUMNS}, (started_at = now() AND step = 0) AS just_started, "
        "(SELECT c.state FROM checkpoints c WHERE c.task_id = tasks.id "
        "AND c.step_index = tasks.step - 1) AS previous_state"
    )
    # psycopg2 sends both as one query string; the result is the UPDATE's.
    sql = f"{outbox.DELETE_ROWS_SQL}; {update}" if delete_outbox else update
    row = (
        conn.execute(
            db.text(sql),
            {
                "task_id": task_id,
                "step": step,
                "token": token,
                "lease": lease_seconds,
                "previous": previous_token,
                "ids": list(delete_outbox),
            },
        )
        .mappings()
        .one_or_none()
    )
    if row is not None and row["just_started"]:
        append_event(conn, row, EventType.STARTED)
    return row


def report_progress(
    conn: Connection, task_id: str, token: str, progress: Mapping[str, Any]
) -> RowMapping | None:
    """Store progress and append ``task.progress``; fenced on the lease."""
    row = _update(
        conn,
        task_id,
        "progress = CAST(:progress AS jsonb)",
        allowed={Status.WORKING},
        where_sql="AND lease_token = :token",
        params={"progress": json.dumps(progress), "token": token},
    )
    if row is not None:
        append_event(conn, row, EventType.PROGRESS)
    return row


def migrate_version(
    conn: Connection,
    task_id: str,
    step: int,
    token: str,
    *,
    from_version: str,
    to_version: str,
    state: Any,
) -> RowMapping | None:
    """Move a leased task from ``from_version`` to ``to_version`` at the start of step
    ``step`` (``task.migrated`` with ``data.from_version``/``data.to_version``); the
    previous checkpoint is replaced by its migrated ``state``, so a re-run of the step
    reads what the new code reads. Fenced on (task, step, lease token, version)."""
    row = _update(
        conn,
        task_id,
        "agent_version = :to_version",
        allowed={Status.WORKING},
        where_sql="AND step = :step AND lease_token = :token AND agent_version = :from_version",
        params={
            "step": step,
            "token": token,
            "from_version": from_version,
            "to_version": to_version,
        },
    )
    if row is None:
        return None
    if step > 0:
        conn.execute(
            db.text(
                "UPDATE checkpoints SET state = CAST(:state AS jsonb) "
                "WHERE task_id = :task_id AND step_index = :step"
            ),
            {"task_id": task_id, "step": step - 1, "state": json.dumps(state)},
        )
    append_event(
        conn,
        row,
        EventType.MIGRATED,
        {"from_version": from_version, "to_version": to_version},
    )
    return row


def commit_step(
    conn: Connection,
    task_id: str,
    step: int,
    token: str,
    *,
    state: Any,
    started_at: datetime,
    attempt: int,
    wake_at: datetime | None = None,
    dispatch: bool = True,
    progress: Mapping[str, Any] | None = None,
    send_next: bool = False,
) -> RowMapping | None:
    """Checkpoint step ``step``: the checkpoint row, ``step + 1``, the lease released,
    ``task.step.completed``. Fenced on (task, step, lease token): ``None`` means another
    execution or a cancel got there first and this step's work must be discarded.

    ``wake_at`` leaves the next step to the timer sweep; ``dispatch`` marks the next
    step as queued now, and the caller adds the outbox row, unless ``send_next`` has it
    added here. ``progress``: the step's last reported progress, not yet stored: stored
    by the same ``UPDATE``, with its ``task.progress`` event (as :func:`report_progress`
    writes it) before the step's.

    Two round trips, one with ``send_next``: the ``UPDATE`` with the checkpoint's
    ``INSERT`` as its ``WITH`` query; the events (both in one ``INSERT``), as a ``WITH``
    query of the outbox row's ``INSERT`` when there is one.
    """
    row = _update(
        conn,
        task_id,
        "step = step + 1, lease_token = NULL, lease_expires_at = NULL, step_retries = 0, "
        "human_input = NULL, wake_at = :wake_at, dispatched_at = CASE WHEN :dispatch THEN now() ELSE NULL END"
        + (", progress = CAST(:progress AS jsonb)" if progress is not None else ""),
        allowed={Status.WORKING},
        where_sql="AND step = :step AND lease_token = :token",
        params={
            "step": step,
            "token": token,
            "wake_at": wake_at,
            "dispatch": dispatch,
            "progress": json.dumps(progress),
            "state": json.dumps(state),
            "attempt": attempt,
            "started_at": started_at,
        },
        events=1 if progress is None else 2,
        also_sql=(
            "INSERT INTO checkpoints (task_id, step_index, state, attempt, started_at) "
            "SELECT id, :step, CAST(:state AS jsonb), :attempt, :started_at FROM task"
        ),
    )
    if row is None:
        return None
    events: list[tuple[Mapping[str, Any], EventType, Mapping[str, Any] | None]] = []
    if progress is not None:  # the task as report_progress would have left it
        events.append(
            ({**row, "step": step, "last_seq": row["last_seq"] - 1}, EventType.PROGRESS, None)
        )
    events.append((row, EventType.STEP_COMPLETED, None))
    sql, params, event_ids = _events_insert(events)
    if send_next:
        outbox.add_step(conn, task_id, step + 1, also=[sql], also_params=params)
    else:
        conn.execute(db.text(sql), params)
    for (task, event_type, _extra), event_id in zip(events, event_ids, strict=True):
        _after_event(conn, task, event_type, event_id)
    return row


def complete(conn: Connection, task_id: str, result: Any) -> RowMapping | None:
    """``working`` → ``completed`` with ``result`` (after the last checkpoint)."""
    row = _update(
        conn,
        task_id,
        "status = 'completed', result = CAST(:result AS jsonb), finished_at = now(), "
        "lease_token = NULL, lease_expires_at = NULL, wake_at = NULL",
        allowed={Status.WORKING},
        params={"result": json.dumps(result)},
    )
    if row is not None:
        append_event(conn, row, EventType.COMPLETED)
    return row


def fail(
    conn: Connection,
    task_id: str,
    error_type: str,
    message: str,
    *,
    token: str | None = None,
    allowed: frozenset[Status] = ACTIVE,
) -> RowMapping | None:
    """Any active state → ``failed``; fenced on the lease when ``token`` is given."""
    return _fail(
        conn,
        task_id,
        error_type,
        message,
        allowed=allowed,
        where_sql="AND lease_token = :token" if token else "",
        params={"token": token},
    )


def _fail(
    conn: Connection,
    task_id: str,
    error_type: str,
    message: str,
    *,
    allowed: frozenset[Status] | set[Status],
    where_sql: str,
    params: Mapping[str, Any],
) -> RowMapping | None:
    """``failed`` with ``{"type", "message"}``: the one way a task fails. A task with
    completed calls still to undo goes to ``compensating`` first (:func:`_enter_compensating`),
    carrying the same ``error``."""
    error = {"type": error_type, "message": message}
    row = _enter_compensating(
        conn, task_id, "failed", allowed=allowed, where_sql=where_sql, params=params, error=error
    )
    if row is not None:
        return row
    row = _update(
        conn,
        task_id,
        "status = 'failed', error = CAST(:error AS jsonb), finished_at = now(), "
        "lease_token = NULL, lease_expires_at = NULL, wake_at = NULL, input_request = NULL",
        allowed=allowed,
        where_sql=where_sql,
        params={**params, "error": json.dumps(error)},
    )
    if row is not None:
        append_event(conn, row, EventType.FAILED)
    return row


def fail_timeout(conn: Connection, task_id: str, token: str | None = None) -> RowMapping | None:
    """Fail a task whose ``timeout_seconds`` passed (``timeout``)."""
    return fail(
        conn,
        task_id,
        ErrorType.TIMEOUT.value,
        "the task did not finish within its timeout_seconds",
        token=token,
    )


def request_input(
    conn: Connection, task_id: str, input_request: Mapping[str, Any]
) -> RowMapping | None:
    """``working`` → ``input_required`` (after the step's checkpoint); holds no worker."""
    row = _update(
        conn,
        task_id,
        "status = 'input_required', input_request = CAST(:req AS jsonb), "
        "lease_token = NULL, lease_expires_at = NULL, wake_at = NULL, dispatched_at = NULL",
        allowed={Status.WORKING},
        params={"req": json.dumps(input_request)},
    )
    if row is not None:
        append_event(conn, row, EventType.INPUT_REQUIRED)
    return row


def resume_with_input(
    conn: Connection, task_id: str, tenant_id: str, human_input: Any
) -> RowMapping | None:
    """``input_required`` → ``working`` (``task.resumed``), keeping ``human_input`` for the
    next step (``ctx.human_input``); the caller enqueues the step.

    A task waiting on its budget (``reason: "budget"``) takes the answer itself:
    ``extend`` raises its limits and the refused step runs again (its own
    ``human_input`` kept); ``{"stop": true}`` fails it with ``budget_exceeded``.
    """
    row = _update(
        conn,
        task_id,
        "status = 'working', input_request = NULL, dispatched_at = now(), "
        "human_input = CAST(:human_input AS jsonb)",
        allowed={Status.INPUT_REQUIRED},
        where_sql="AND tenant_id = :tenant_id "
        f"AND (input_request->>'reason') IS DISTINCT FROM '{budgets.ASK_REASON}'",
        params={"tenant_id": tenant_id, "human_input": json.dumps(human_input)},
    )
    if row is not None:
        append_event(conn, row, EventType.RESUMED)
        return row
    return _resume_budget(conn, task_id, tenant_id, human_input)


def _resume_budget(
    conn: Connection, task_id: str, tenant_id: str, answer: Any
) -> RowMapping | None:
    waiting = get(conn, task_id, tenant_id)
    if (
        waiting is None
        or waiting["status"] != Status.INPUT_REQUIRED
        or not budgets.is_budget_request(waiting["input_request"])
    ):
        return None
    answer = answer if isinstance(answer, Mapping) else {}
    scope = {"where_sql": "AND tenant_id = :tenant_id", "params": {"tenant_id": tenant_id}}
    if answer.get("stop") is True:
        prompt = waiting["input_request"].get("prompt") or "budget exhausted"
        return _fail(
            conn,
            task_id,
            budgets.ERROR_TYPE,
            f"{prompt} (stopped by input)",
            allowed={Status.INPUT_REQUIRED},
            **scope,
        )
    budget = budgets.extended(waiting["budget"], answer.get("extend") or {})
    row = _update(
        conn,
        task_id,
        "status = 'working', input_request = NULL, dispatched_at = now(), "
        "budget = CAST(:budget AS jsonb)",
        allowed={Status.INPUT_REQUIRED},
        where_sql=scope["where_sql"],
        params={**scope["params"], "budget": json.dumps(budget)},
    )
    if row is not None:
        append_event(conn, row, EventType.RESUMED)
    return row


def request_budget_input(
    conn: Connection, task_id: str, token: str, input_request: Mapping[str, Any]
) -> RowMapping | None:
    """A budget with ``on_exhausted: "ask"`` refused a call or a step: ``working`` →
    ``input_required`` with no checkpoint, so the same step runs again (replaying its
    completed calls) once the budget is extended. Fenced on the lease."""
    row = _update(
        conn,
        task_id,
        "status = 'input_required', input_request = CAST(:req AS jsonb), "
        "lease_token = NULL, lease_expires_at = NULL, wake_at = NULL, dispatched_at = NULL, "
        "step_retries = 0",
        allowed={Status.WORKING},
        where_sql="AND lease_token = :token",
        params={"req": json.dumps(input_request), "token": token},
    )
    if row is not None:
        append_event(conn, row, EventType.INPUT_REQUIRED)
    return row


def cancel(conn: Connection, task_id: str, tenant_id: str) -> RowMapping | None:
    """Any active state → ``cancelled`` at once; the lease is dropped so that the
    running step's checkpoint fails its fence and its late output is discarded. A task
    with completed calls still to undo goes to ``compensating`` instead (V2.md 5: the
    API answers ``202``); a compensating task is not matched (the caller answers it as
    it is).

    Either way the task's non-terminal children are cancelled too, each through this
    same transition (so, recursively, theirs), in the same transaction (V2.md 6)."""
    scope = {"where_sql": "AND tenant_id = :tenant_id", "params": {"tenant_id": tenant_id}}
    row = _enter_compensating(conn, task_id, "cancelled", allowed=ACTIVE, **scope)
    if row is not None:
        _cancel_children(conn, task_id, tenant_id)
        return row
    row = _update(
        conn,
        task_id,
        "status = 'cancelled', finished_at = now(), lease_token = NULL, "
        "lease_expires_at = NULL, wake_at = NULL, input_request = NULL",
        allowed=ACTIVE,
        where_sql="AND tenant_id = :tenant_id",
        params={"tenant_id": tenant_id},
    )
    if row is not None:
        append_event(conn, row, EventType.CANCELLED)
        _cancel_children(conn, task_id, tenant_id)
    return row


def _cancel_children(conn: Connection, task_id: str, tenant_id: str) -> None:
    """Cancel the cancelled ``task_id``'s non-terminal children, in spawn order. The
    parent row is locked first and each child after it (top down); a child finishing
    meanwhile never waits for the parent (``app.store.children``), so the two cannot
    deadlock, and a child that became terminal first is simply not matched."""
    for child_id in children.active_children(conn, task_id):
        cancel(conn, child_id, tenant_id)


def retry_step_later(
    conn: Connection, task_id: str, step: int, token: str, delay_seconds: float, reason: str
) -> RowMapping | None:
    """A step raised a transient error: release the lease, count the retry, and leave
    the re-run to the timer sweep at ``now + delay`` (``task.retrying``)."""
    row = _update(
        conn,
        task_id,
        "lease_token = NULL, lease_expires_at = NULL, step_retries = step_retries + 1, "
        "wake_at = now() + make_interval(secs => :delay), dispatched_at = NULL",
        allowed={Status.WORKING},
        where_sql="AND step = :step AND lease_token = :token",
        params={"step": step, "token": token, "delay": delay_seconds},
    )
    if row is not None:
        append_event(conn, row, EventType.RETRYING)
    return row


def wake(conn: Connection, task_id: str) -> RowMapping | None:
    """A due timer: clear ``wake_at`` and mark the step queued (no event; the caller
    adds the outbox row). Guarded so a second beat waking the same task is a no-op."""
    return (
        conn.execute(
            db.text(
                "UPDATE tasks SET wake_at = NULL, dispatched_at = now(), updated_at = now() "
                "WHERE id = :task_id AND status IN ('pending', 'working', 'compensating') "
                f"AND wake_at IS NOT NULL AND wake_at <= now() RETURNING {TASK_COLUMNS}"
            ),
            {"task_id": task_id},
        )
        .mappings()
        .one_or_none()
    )


def reclaim_expired_lease(
    conn: Connection, task_id: str, max_attempts: int
) -> tuple[str, RowMapping] | None:
    """The reaper's step for one task whose lease expired: its worker is presumed lost.

    Below ``max_attempts`` the task gets ``attempt + 1`` and ``task.retrying`` (the
    caller enqueues the step again); at the limit it fails with ``worker_lost``.
    Returns ``("retried" | "failed", row)``, or ``None`` when the lease was renewed or
    released in the meantime.
    """
    lease_expired = "AND lease_token IS NOT NULL AND lease_expires_at < now()"
    row = _reclaim_undo_lease(conn, task_id, lease_expired)
    if row is not None:
        return "retried", row
    row = _update(
        conn,
        task_id,
        "attempt = attempt + 1, lease_token = NULL, lease_expires_at = NULL, dispatched_at = now()",
        allowed={Status.WORKING},
        where_sql=f"{lease_expired} AND attempt < :max_attempts",
        params={"max_attempts": max_attempts},
    )
    if row is not None:
        append_event(conn, row, EventType.RETRYING)
        return "retried", row
    row = _fail(
        conn,
        task_id,
        ErrorType.WORKER_LOST,
        f"the worker running this task was lost during attempt {max_attempts} of {max_attempts}",
        allowed={Status.WORKING},
        where_sql=lease_expired,
        params={},
    )
    if row is not None:
        return "failed", row
    return None


# --- compensation (V2.md sections 2 and 5) ----------------------------------------------------
#
# A task headed for failed or cancelled with completed calls still to undo (what is owed:
# app.store.compensation) enters compensating instead; its undos run as steps of their
# own (app.engine.compensation) under a lease like any step, and the last one moves it
# to the terminal state it was headed for. compensating is in no other ``allowed`` set:
# a cancel or a deadline during it changes nothing.


def _enter_compensating(
    conn: Connection,
    task_id: str,
    reason: str,
    *,
    allowed: frozenset[Status] | set[Status],
    where_sql: str,
    params: Mapping[str, Any],
    error: Mapping[str, Any] | None = None,
) -> RowMapping | None:
    """``allowed`` → ``compensating`` with ``compensation = {"reason", "total", "done":
    0, "failed": 0}`` (and the failure's ``error``), ``task.compensating``, and the
    first undo step queued; ``None`` when nothing is owed (or the guard did not match)."""
    row = _update(
        conn,
        task_id,
        "status = 'compensating', error = CAST(:undo_error AS jsonb), "
        "compensation = jsonb_build_object('reason', CAST(:undo_reason AS text), "
        f"'total', ({undo_log.OWED_COUNT_SQL}), 'done', 0, 'failed', 0), "
        "lease_token = NULL, lease_expires_at = NULL, wake_at = NULL, input_request = NULL, "
        "waiting_for = NULL, dispatched_at = now()",
        allowed=allowed,
        where_sql=f"{where_sql} AND EXISTS ({undo_log.OWED_SQL})",
        params={
            **params,
            "undo_reason": reason,
            "undo_error": json.dumps(error) if error is not None else None,
        },
    )
    if row is not None:
        append_event(conn, row, EventType.COMPENSATING)
        outbox.add_step(conn, task_id, row["step"])
    return row


def acquire_undo_lease(
    conn: Connection,
    task_id: str,
    step: int,
    token: str,
    lease_seconds: float,
    previous_token: str | None = None,
) -> RowMapping | None:
    """Take the lease of a ``compensating`` task for its next undos (no event): matches
    only at this step, not waiting for a retry, and unleased (or still leased by
    ``previous_token``, as :func:`acquire_lease`)."""
    return _update(
        conn,
        task_id,
        "lease_token = :token, lease_expires_at = now() + make_interval(secs => :lease)",
        allowed={Status.COMPENSATING},
        where_sql="AND step = :step AND (lease_token IS NULL OR lease_token = :previous) "
        "AND wake_at IS NULL",
        params={"step": step, "token": token, "lease": lease_seconds, "previous": previous_token},
        events=0,
    )


def retry_undo_later(
    conn: Connection, task_id: str, token: str, delay_seconds: float
) -> RowMapping | None:
    """Release the undo lease and leave the next undo step to the timer sweep at
    ``now + delay`` (an undo's backoff, or calls still in flight). No event."""
    return _update(
        conn,
        task_id,
        "lease_token = NULL, lease_expires_at = NULL, dispatched_at = NULL, "
        "wake_at = now() + make_interval(secs => :delay)",
        allowed={Status.COMPENSATING},
        where_sql="AND lease_token = :token",
        params={"token": token, "delay": delay_seconds},
        events=0,
    )


def finish_compensation(conn: Connection, task_id: str, token: str) -> RowMapping | None:
    """``compensating`` → ``failed`` or ``cancelled`` (its ``compensation.reason``) once
    nothing is owed; ``compensation`` and a failure's ``error`` are kept. Fenced on
    the undo lease."""
    row = _update(
        conn,
        task_id,
        "status = CASE WHEN compensation->>'reason' = 'failed' THEN 'failed'::task_status "
        "ELSE 'cancelled'::task_status END, finished_at = now(), lease_token = NULL, "
        "lease_expires_at = NULL, wake_at = NULL",
        allowed={Status.COMPENSATING},
        where_sql="AND lease_token = :token",
        params={"token": token},
    )
    if row is not None:
        terminal = EventType.FAILED if row["status"] == Status.FAILED else EventType.CANCELLED
        append_event(conn, row, terminal)
    return row


def _reclaim_undo_lease(conn: Connection, task_id: str, lease_expired: str) -> RowMapping | None:
    """The reaper, for a compensating task whose undo step's worker is lost: the lease
    is cleared and the step queued again (``attempt + 1``, no event, no limit: the
    undos' own tries are bounded, so a compensation always ends)."""
    return _update(
        conn,
        task_id,
        "attempt = attempt + 1, lease_token = NULL, lease_expires_at = NULL, dispatched_at = now()",
        allowed={Status.COMPENSATING},
        where_sql=lease_expired,
        events=0,
    )


def get(conn: Connection, task_id: str, tenant_id: str | None = None) -> RowMapping | None:
    """The task row (scoped to ``tenant_id`` when given), or ``None``."""
    sql = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = :task_id"
    if tenant_id is not None:
        sql += " AND tenant_id = :tenant_id"
    return (
        conn.execute(db.text(sql), {"task_id": task_id, "tenant_id": tenant_id})
        .mappings()
        .one_or_none()
    )
