"""Undo a failed or cancelled task's completed calls (V2.md sections 2 and 5): sagas.

A task headed for ``failed`` or ``cancelled`` that owes undos is ``compensating``
(:mod:`app.store.lifecycle`), with a step message queued the normal way. That message
reaches :func:`run_undo_step` (from :func:`app.engine.runner.run_step`), which takes the
task's lease like any step, so the reaper, the lost-message sweep and a SIGKILLed
worker's recovery work unchanged, and then undoes what is owed **newest first**:

- each undo is a logged call (``kind = 'compensation'``, at the undone call's index,
  key ``<original key>-undo``), logged ``started`` under the lease before it is made,
  so a worker killed inside it leaves a row the next worker makes again with the same
  key, and a completed one is never made again;
- the compensating tool is called as ``fn(call, args=<the original arguments>,
  output=<the original output>)``;
- a transient error (:func:`app.engine.context.is_transient`: a connection error, a
  timeout, :class:`~outlast.RetryableError`, which HTTP tools raise after retrying 5xx
  answers) releases the lease and the undo is made again after
  ``Backoff(OUTLAST_STEP_RETRY_BASE_SECONDS)`` held in ``wake_at`` (a durable timer),
  at most ``OUTLAST_STEP_RETRIES + 1`` tries in all (a try cut short by a lost worker
  counts); then, or at once on any other error (a 4xx answer), the undo is final and
  counts in ``compensation.failed``. A compensation always ends;
- budgets are not consulted: an undo is never refused (V2.md 3 limits what a task
  does, not what it takes back);
- calls of a step that was still running when its task was cancelled may complete
  after the cancel: undos wait (a short timer) while such a call started less than
  :func:`settle_seconds` ago is in flight, so that it is undone first if it completes.

When nothing is owed any more the task moves to ``failed`` (keeping its ``error``) or
``cancelled``, with its final ``compensation`` and the terminal event and webhook.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from app import settings as settings_mod
from app.engine.context import is_transient
from app.engine.lease import LeaseKeeper
from app.engine.tools import get_tool
from app.ops import logs, metrics
from app.store import compensation as undo_log
from app.store import db, db_errors, ids, lifecycle, tool_calls
from outlast.backoff import Backoff
from outlast.sdk import Cancelled, ToolCall

log = logging.getLogger(__name__)

# While a cancelled step's call may still complete, undos look again this often.
IN_FLIGHT_POLL_SECONDS = 1.0
# An undo step that broke for a reason of its own (a bug) is tried again this much later.
BROKEN_RETRY_SECONDS = 5.0


class UndoOutage(Exception):
    """The database became unreachable while this message held the undo lease; the
    runner turns it into its ``OutageDuringStep`` (the Celery task retries the message
    with ``token``, which takes the lease over)."""

    def __init__(self, token: str):
        super().__init__("database unavailable during an undo step")
        self.token = token


def undo_tries(cfg: settings_mod.Settings) -> int:
    """How many times one undo is tried before it counts as failed."""
    return cfg.step_retries + 1


def settle_seconds(cfg: settings_mod.Settings) -> float:
    """How long a call in flight at a cancel is waited for (two leases)."""
    return 2 * cfg.lease_seconds


def undo_delay(tries_done: int, cfg: settings_mod.Settings) -> float:
    """The backoff before the next try of an undo that failed transiently."""
    return Backoff(base=cfg.step_retry_base_seconds, cap=600.0).delay(tries_done)


def _raise_if_lost(lease: LeaseKeeper) -> None:
    """What a tool's ``call.check_cancelled`` does during an undo."""
    if lease.lost.is_set():
        raise Cancelled("this undo step lost its lease")


def run_undo_step(task_id: str, step: int, held_token: str | None = None) -> str:
    """Run the owed undos of a ``compensating`` task if this message can lease it.

    Returns ``skipped`` (not compensating, leased elsewhere, or waiting for a timer),
    ``compensating`` (released to wait for a backoff or a call in flight),
    ``failed``/``cancelled`` (every undo finished: the task is terminal), or
    ``discarded`` (the lease was lost).
    """
    cfg = settings_mod.current()
    token = ids.new_token()
    with db.transaction() as conn:
        task = lifecycle.acquire_undo_lease(
            conn, task_id, step, token, cfg.lease_seconds, previous_token=held_token
        )
    if task is None:
        log.info("step %d of %s is not runnable by this message; dropped", step, task_id)
        return "skipped"
    logs.bind(agent=task["agent"], agent_version=task["agent_version"], attempt=task["attempt"])
    try:
        # Renewed by the process's lease renewer, fenced on ``compensating``.
        with LeaseKeeper(task_id, token, cfg.lease_seconds, None, status="compensating") as lease:
            return _undo_owed(task_id, token, lease, cfg)
    except Exception as exc:
        if db_errors.is_database_unavailable(exc):
            raise UndoOutage(token) from exc
        log.exception("the undo step of %s could not run", task_id)
        return _later(task_id, token, BROKEN_RETRY_SECONDS)


def _undo_owed(task_id: str, token: str, lease: LeaseKeeper, cfg: settings_mod.Settings) -> str:
    """Undo what is owed, newest first, until nothing is (then finish) or an undo must
    wait for its next try."""
    while True:
        if lease.lost.is_set():
            return "discarded"
        with db.engine().connect() as conn:
            in_flight = undo_log.calls_in_flight(conn, task_id, settle_seconds(cfg))
            owed = undo_log.next_owed(conn, task_id)
        if in_flight:
            log.info("undos of %s wait for a call still in flight", task_id)
            return _later(task_id, token, IN_FLIGHT_POLL_SECONDS)
        if owed is None:
            return _finish(task_id, token)
        outcome = _undo_one(task_id, token, lease, owed, cfg)
        if outcome is not None:
            return outcome


def _undo_one(
    task_id: str, token: str, lease: LeaseKeeper, owed: Any, cfg: settings_mod.Settings
) -> str | None:
    """Make one undo; ``None`` to go on with the next, else the step's outcome."""
    name = owed["compensate"]
    where = {
        "task_id": task_id,
        "step": owed["step_index"],
        "call_index": owed["call_index"],
        "name": name,
        "key": undo_log.undo_key(owed["idempotency_key"]),
    }
    tool = get_tool(name)
    if tool is None:
        return _give_up(token, where, {"type": "AgentError", "message": f"no tool named {name!r}"})
    if (owed["undo_attempts"] or 0) >= undo_tries(cfg):
        message = f"the undo was tried {owed['undo_attempts']} times (a worker was lost)"
        return _give_up(token, where, {"type": "AgentError", "message": message})
    with db.transaction() as conn:
        started = undo_log.begin_undo(conn, args=owed["args"], lease_token=token, **where)
    if started is None:
        return "discarded" if lease.lost.is_set() else None  # lost, or finished meanwhile
    call = ToolCall(
        task_id=task_id,
        step=owed["step_index"],
        index=owed["call_index"],
        key=where["key"],
        attempt=started["attempts"],
        check_cancelled=functools.partial(_raise_if_lost, lease),
    )
    log.info(
        "undoing %s call %d of step %d with %s (try %d)",
        owed["name"],
        owed["call_index"],
        owed["step_index"],
        name,
        started["attempts"],
    )
    try:
        output = tool_calls.storable(tool.fn(call, args=owed["args"], output=owed["output"]))
        json.dumps(output)
    except Cancelled:
        return "discarded"
    except Exception as exc:
        metrics.tool_call(name, "failed")
        error = {"type": type(exc).__name__, "message": str(exc)[:2000]}
        if not is_transient(exc) or started["attempts"] >= undo_tries(cfg):
            return _give_up(token, where, error)
        with db.transaction() as conn:
            undo_log.fail_undo(conn, error=error, final=False, **where)
        delay = undo_delay(started["attempts"], cfg)
        log.warning("undo of %s failed, next try in %.1fs: %s", where["key"], delay, exc)
        return _later(task_id, token, delay)
    with db.transaction() as conn:
        tool_calls.complete(
            conn, task_id, owed["step_index"], owed["call_index"], output, kind=undo_log.KIND_UNDO
        )
        undo_log.refresh(conn, task_id, token)
    metrics.tool_call(name, "completed")
    return None


def _give_up(token: str, where: dict[str, Any], error: dict[str, Any]) -> None:
    """The undo is final: counted in ``compensation.failed``; the next one goes on."""
    log.warning("undo %s failed for good: %s", where["key"], error["message"])
    with db.transaction() as conn:
        undo_log.fail_undo(conn, error=error, final=True, **where)
        undo_log.refresh(conn, where["task_id"], token)
    return None


def _later(task_id: str, token: str, delay: float) -> str:
    with db.transaction() as conn:
        row = lifecycle.retry_undo_later(conn, task_id, token, delay)
    return "compensating" if row is not None else "discarded"


def _finish(task_id: str, token: str) -> str:
    with db.transaction() as conn:
        undo_log.refresh(conn, task_id, token)
        row = lifecycle.finish_compensation(conn, task_id, token)
    if row is None:
        return "discarded"
    log.info("compensation of %s done: %s %s", task_id, row["status"], row["compensation"])
    return str(row["status"])
