"""Run one step of one task (DESIGN.md, mechanism 3): lease, run, checkpoint.

``run_step(task_id, step)`` is what the ``outlast.run_step`` Celery task does:

1. take the lease on exactly this step (a conditional UPDATE with a fresh token); a
   duplicate or stale message finds the lease held or the step past and returns;
2. load the previous checkpoint and run the agent's step function once, while a thread
   renews the lease every lease/3 seconds (and notices a cancel or the deadline);
3. commit the outcome in one transaction fenced on (task, step, token): the checkpoint,
   the status change, the events, and the outbox row of the next step (published right
   after the commit). A step whose fence fails is discarded.

Versions (V2.md section 7): a step runs only with the code of the agent version its
task is pinned to, or after that version's checkpoint is migrated to a newer version
this process has (``task.migrated``, at the start of the step, under the lease). A
process that can do neither takes nothing: the lease it took is rolled back (no status
change, no attempt, no event) and the step's message is re-sent to its version's queue,
which only workers that can take it consume. A migration that raises fails the task
with ``agent_error`` naming it.

Failures: the SDK's retryable errors and connection errors/timeouts re-run the step
after an exponential backoff held in ``tasks.wake_at`` (no worker waits), at most
``OUTLAST_STEP_RETRIES`` times; anything else fails the task with ``agent_error``; a bad
return value fails it with ``invalid_output``; the task deadline fails it with
``timeout``.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from sqlalchemy.engine import RowMapping

from app import settings as settings_mod
from app.engine import children, compensation, registry
from app.engine.context import (
    BudgetExhausted,
    NondeterministicReplay,
    StepContext,
    is_transient,
)
from app.engine.lease import LeaseKeeper
from app.ops import logs
from app.store import budgets, db, db_errors, ids, lifecycle, outbox
from outlast.backoff import Backoff
from outlast.sdk import Cancelled, Continue, Done, Fail, SleepUntil, WaitForChildren, WaitForInput

log = logging.getLogger(__name__)

# Step-retry backoff: base * 2**retries seconds, at most this long.
RETRY_BACKOFF_MAX_SECONDS = 600.0
# How often a lost connection is retried when committing a finished step, and how long
# it waits between tries (1, 2, 4 s).
COMMIT_ATTEMPTS = 4
COMMIT_RETRY = Backoff(base=1.0, cap=4.0)


# error.type of a task whose re-run asked a logged call with other arguments (V2.md 12).
NONDETERMINISTIC_REPLAY = "nondeterministic_replay"


def retry_delay(retries_done: int, base: float = 1.0) -> float:
    """Backoff before re-running a step that raised a transient error."""
    return Backoff(base=base, cap=RETRY_BACKOFF_MAX_SECONDS).delay(retries_done + 1)


class _NotRunnableHere(Exception):
    """This process has no code for the task's agent version (rolls the lease back)."""

    def __init__(self, agent: str, version: str):
        super().__init__(f"{agent}@{version}")
        self.agent = agent
        self.version = version


class OutageDuringStep(Exception):
    """The database became unreachable after this message took the step's lease. The
    Celery task retries the message with ``token``, so that the retry takes the lease
    over instead of waiting for the reaper (which would add 1 to ``attempt``)."""

    def __init__(self, token: str):
        super().__init__(f"database unavailable during the step (lease {token[:8]}…)")
        self.token = token


def run_step(task_id: str, step: int, held_token: str | None = None) -> str:
    """Run step ``step`` of ``task_id`` if this message is the one to run it.

    ``held_token`` is the lease this message took before a database outage interrupted
    the step (see :class:`OutageDuringStep`).

    Returns what happened (for logs and tests): ``skipped`` (duplicate or stale
    message), ``rerouted`` (this process lacks the task's agent version: the message
    went to that version's queue, nothing else changed), ``continued``, ``completed``,
    ``input_required``, ``sleeping``, ``retrying``, ``failed``, ``discarded`` (the
    lease was lost before the commit), ``waiting`` (for child tasks); for a
    ``compensating`` task, what :func:`app.engine.compensation.run_undo_step` returns.
    """
    cfg = settings_mod.current()
    token = ids.new_token()
    # The rows of messages this process sent since its last step are deleted by this
    # lease's round trip rather than by a commit of their own.
    deleted = outbox.sent_rows.take()
    try:
        with db.transaction() as conn:
            task = lifecycle.acquire_lease(
                conn,
                task_id,
                step,
                token,
                cfg.lease_seconds,
                previous_token=held_token,
                delete_outbox=deleted,
            )
            plan = None
            if task is not None:
                plan = registry.resolve(task["agent"], task["agent_version"])
                if plan is None:
                    raise _NotRunnableHere(task["agent"], task["agent_version"])
    except _NotRunnableHere as missing:
        outbox.sent_rows.put_back(deleted)  # rolled back with the lease
        return _leave_for_its_version(task_id, step, missing.agent, missing.version)
    except BaseException:
        outbox.sent_rows.put_back(deleted)
        raise
    state = task["previous_state"] if task is not None else None
    if task is None:  # a compensating task's undos are steps too (V2.md 5)
        try:
            return compensation.run_undo_step(task_id, step, held_token)
        except compensation.UndoOutage as outage:
            raise OutageDuringStep(outage.token) from outage.__cause__
    if plan is None:
        log.info("step %d of %s is not runnable by this message; dropped", step, task_id)
        return "skipped"
    # On every line of this step.
    logs.bind(agent=task["agent"], agent_version=task["agent_version"], attempt=task["attempt"])
    started_at = datetime.now(UTC)
    deadline_at = task["deadline_at"]
    if deadline_at is not None and started_at >= deadline_at:
        with db.transaction() as conn:
            lifecycle.fail_timeout(conn, task_id, token=token)
        return "failed"
    try:
        return _run_leased(task, plan, step, token, state, started_at, cfg)
    except Exception as exc:
        # Whatever broke after the lease was taken, do not leave it to expire into
        # worker_lost: a database outage is retried by the Celery task (the reaper then
        # resumes the step); anything else is this task's failure.
        if db_errors.is_database_unavailable(exc):
            raise OutageDuringStep(token) from exc
        log.exception("step %d of %s could not run", step, task_id)
        return _finish_failed(task_id, token, "agent_error", _describe(exc))


def _leave_for_its_version(task_id: str, step: int, agent: str, version: str) -> str:
    """This process cannot take the step (it came through a queue other than its
    version's: the legacy ``steps`` queue, or a version's queue it left by migrating):
    send it to its version's queue, where it waits for a worker that has the code."""

    def work() -> str:
        with db.transaction() as conn:
            still_waiting = conn.execute(
                sa.text(
                    "UPDATE tasks SET dispatched_at = now() WHERE id = :id AND step = :step "
                    "AND status IN ('pending', 'working') AND lease_token IS NULL "
                    "AND wake_at IS NULL RETURNING id"
                ),
                {"id": task_id, "step": step},
            ).scalar()
            if still_waiting is not None:
                outbox.add_step(conn, task_id, step)
        return "rerouted"

    logs.bind(agent=agent, agent_version=version)
    log.info(
        "step %d of %s needs agent %s version %s, which this worker lacks: left for a "
        "worker that has it",
        step,
        task_id,
        agent,
        version,
    )
    return _with_db_retries(work)


def _migrate(
    task: RowMapping, plan: registry.Plan, step: int, token: str, state: Any
) -> tuple[str, Any]:
    """Run the plan's migration on the previous checkpoint (there is none before step
    0) and commit it with the new version (``task.migrated``). Returns ``("migrated", state)``, ``("failed", why)``
    (the task must fail with that message) or ``("discarded", None)`` (lease lost)."""
    name = plan.migration_name
    where = f"the migration of agent {task['agent']!r} from version {plan.from_version} to "
    where += f"{plan.agent.version} ({name})"
    try:
        # A task that has not run a step yet has no checkpoint to migrate.
        migrated = plan.migration(state, task["input"] or {}) if step > 0 else None
    except Exception as exc:
        log.exception("step %d of %s: %s raised", step, task["id"], where)
        return "failed", f"{where} raised: {_describe(exc)}"
    problem = _check_json(migrated, "state")
    if problem is not None:
        return "failed", f"{where} failed: {problem}"

    def work() -> Any:
        with db.transaction() as conn:
            return lifecycle.migrate_version(
                conn,
                task["id"],
                step,
                token,
                from_version=plan.from_version,
                to_version=plan.agent.version,
                state=migrated,
            )

    if _with_db_retries(work) is None:
        return "discarded", None  # cancelled or reaped meanwhile
    logs.bind(agent_version=plan.agent.version)
    log.info("step %d of %s: %s done", step, task["id"], where)
    return "migrated", migrated


def _run_leased(
    task: RowMapping,
    plan: registry.Plan,
    step: int,
    token: str,
    state: Any,
    started_at: datetime,
    cfg: settings_mod.Settings,
) -> str:
    task_id = task["id"]
    deadline_at = task["deadline_at"]
    agent = plan.agent
    refused = budgets.refusal(budgets.STEP, task["budget"], task["usage"], step=step)
    if refused is not None:  # max_steps is checked before a step starts
        return _budget_exhausted(task_id, token, task["budget"], BudgetExhausted(*refused))
    keeper = LeaseKeeper(task_id, token, cfg.lease_seconds, deadline_at)
    ctx = StepContext(
        task_id=task_id,
        step=step,
        attempt=task["attempt"],
        input=agent.defaults(task["input"] or {}),
        human_input=task["human_input"],
        lease=keeper,
        usage=task["usage"],
        budget=task["budget"],
    )
    with keeper:
        try:
            if plan.migration is not None:
                migrated, state = _migrate(task, plan, step, token, state)
                if migrated == "failed":
                    return _finish_failed(task_id, token, "agent_error", state)
                if migrated == "discarded":
                    return "discarded"
            outcome = _step(agent, ctx, state, keeper)
        except BudgetExhausted as exc:
            if keeper.lost.is_set():
                return "discarded"
            return _budget_exhausted(task_id, token, task["budget"], exc)
        except Cancelled as exc:
            if keeper.deadline_passed():
                with db.transaction() as conn:
                    lifecycle.fail_timeout(conn, task_id, token=token)
                return "failed"
            if not keeper.lost.is_set() and keeper.held():
                # The agent raised Cancelled itself while the task runs: a bug, not a cancel.
                return _finish_failed(task_id, token, "agent_error", _describe(exc))
            log.info(
                "step %d of %s stopped: the task was cancelled or its lease lost", step, task_id
            )
            return "discarded"
        except NondeterministicReplay as exc:
            if keeper.lost.is_set():
                return "discarded"
            return _finish_failed(task_id, token, NONDETERMINISTIC_REPLAY, str(exc))
        except SoftTimeLimitExceeded:
            return _finish_failed(task_id, token, "agent_error", "the step exceeded its time limit")
        except Exception as exc:
            if keeper.lost.is_set():
                return "discarded"  # a cancel or deadline got there first; late errors are moot
            if db_errors.is_database_unavailable(exc):
                raise  # not the agent's fault: the Celery task backs off, the reaper resumes
            if is_transient(exc):
                return _retry_or_fail(task_id, step, token, exc, cfg)
            log.exception("step %d of %s raised", step, task_id)
            return _finish_failed(task_id, token, "agent_error", _describe(exc))
        if keeper.lost.is_set():
            return "discarded"
        if ctx.nondeterministic is not None:  # the agent caught NondeterministicReplay
            keeper.flush_progress()
            return _finish_failed(task_id, token, NONDETERMINISTIC_REPLAY, ctx.nondeterministic)
        if ctx.refused is not None:  # the agent caught the refusal; it still stands
            keeper.flush_progress()
            return _budget_exhausted(task_id, token, task["budget"], ctx.refused)
        return _commit(task_id, step, token, outcome, started_at, task["attempt"], keeper)


def _step(agent: Any, ctx: StepContext, state: Any, keeper: LeaseKeeper) -> Any:
    """The agent's step function; progress it reported before raising is written before
    whatever the runner writes about the exception (events keep their order)."""
    try:
        return agent.step(ctx, state)
    except BaseException:
        keeper.flush_progress()
        raise


def _budget_exhausted(task_id: str, token: str, budget: Any, exc: BudgetExhausted) -> str:
    """The budget refused a call or a step: fail, or ask for more (V2.md section 3)."""
    if (budget or {}).get("on_exhausted") != "ask":
        return _finish_failed(task_id, token, budgets.ERROR_TYPE, str(exc))
    request = budgets.ask_request(exc.limit, exc.value)

    def work() -> str:
        with db.transaction() as conn:
            row = lifecycle.request_budget_input(conn, task_id, token, request)
        return "input_required" if row is not None else "discarded"

    return _with_db_retries(work)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return (text if text else type(exc).__name__)[:2000]


def _with_db_retries(work: Any) -> Any:
    """Run ``work`` (one transaction); retry a few times if the database dropped."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return work()
        except Exception as exc:
            if attempt == COMMIT_ATTEMPTS or not db_errors.is_database_unavailable(exc):
                raise
            time.sleep(COMMIT_RETRY.delay(attempt))
    raise AssertionError("unreachable")


def _finish_failed(task_id: str, token: str, error_type: str, message: str) -> str:
    def work() -> str:
        with db.transaction() as conn:
            row = lifecycle.fail(conn, task_id, error_type, message, token=token)
        return "failed" if row is not None else "discarded"

    return _with_db_retries(work)


def _retry_or_fail(
    task_id: str, step: int, token: str, exc: BaseException, cfg: settings_mod.Settings
) -> str:
    with db.engine().connect() as conn:
        retries_done = conn.execute(
            sa.text("SELECT step_retries FROM tasks WHERE id = :id"), {"id": task_id}
        ).scalar_one()
    if retries_done >= cfg.step_retries:
        return _finish_failed(
            task_id,
            token,
            "agent_error",
            f"{_describe(exc)} (the step failed {retries_done + 1} times with a transient error)",
        )
    delay = retry_delay(retries_done, cfg.step_retry_base_seconds)
    log.warning("step %d of %s: transient error, retry in %.1fs: %s", step, task_id, delay, exc)

    def work() -> str:
        with db.transaction() as conn:
            row = lifecycle.retry_step_later(conn, task_id, step, token, delay, _describe(exc))
        return "retrying" if row is not None else "discarded"

    return _with_db_retries(work)


def _check_json(value: Any, what: str) -> str | None:
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"the step returned a {what} that is not JSON: {exc}"
    limit = settings_mod.current().max_checkpoint_bytes
    size = len(encoded.encode("utf-8"))
    if size > limit:  # refused here, with a clear error, rather than breaking the commit
        return (
            f"the step returned a {what} of {size} bytes as JSON, more than "
            f"OUTLAST_MAX_CHECKPOINT_BYTES ({limit})"
        )
    return None


def _commit(
    task_id: str,
    step: int,
    token: str,
    outcome: Any,
    started_at: datetime,
    attempt: int,
    keeper: LeaseKeeper,
) -> str:
    """Write the step's outcome, fenced on the lease (one transaction), with the
    progress the step reported last (its ``task.progress`` event comes first)."""
    problem = _outcome_problem(outcome)
    if problem is not None or isinstance(outcome, Fail):
        keeper.flush_progress()
    if problem is not None:
        return _finish_failed(task_id, token, "invalid_output", problem)
    if isinstance(outcome, Fail):
        return _finish_failed(task_id, token, outcome.type or "agent_error", outcome.message)
    if isinstance(outcome, WaitForChildren):  # V2.md 6: the ids must be this task's children
        problem = children.wait_problem(task_id, outcome)
        if problem is not None:
            keeper.flush_progress()
            return _finish_failed(task_id, token, "invalid_output", problem)
    progress = keeper.take_progress()

    def work() -> str:
        with db.transaction() as conn:
            common = {"started_at": started_at, "attempt": attempt}
            if isinstance(outcome, WaitForChildren):
                # children.commit_wait writes the checkpoint; the progress goes first
                if progress is not None and not lifecycle.report_progress(
                    conn, task_id, token, progress
                ):
                    return "discarded"  # the same fence as the checkpoint's
                return children.commit_wait(conn, task_id, step, token, outcome, **common)
            common["progress"] = progress
            if isinstance(outcome, Continue):
                row = lifecycle.commit_step(
                    conn, task_id, step, token, state=outcome.state, send_next=True, **common
                )
                return "continued" if row is not None else "discarded"
            if isinstance(outcome, Done):
                row = lifecycle.commit_step(
                    conn, task_id, step, token, state=None, dispatch=False, **common
                )
                if row is None:
                    return "discarded"
                lifecycle.complete(conn, task_id, outcome.result)
                return "completed"
            if isinstance(outcome, WaitForInput):
                row = lifecycle.commit_step(
                    conn, task_id, step, token, state=outcome.state, dispatch=False, **common
                )
                if row is None:
                    return "discarded"
                request = {"prompt": outcome.prompt, "schema": dict(outcome.schema)}
                if getattr(outcome, "reason", None):
                    request["reason"] = outcome.reason
                lifecycle.request_input(conn, task_id, request)
                return "input_required"
            assert isinstance(outcome, SleepUntil)
            row = lifecycle.commit_step(
                conn,
                task_id,
                step,
                token,
                state=outcome.state,
                wake_at=outcome.wake_at,
                dispatch=False,
                **common,
            )
            return "sleeping" if row is not None else "discarded"

    return _with_db_retries(work)


def _outcome_problem(outcome: Any) -> str | None:
    """Why ``outcome`` cannot be committed (``invalid_output``), or ``None``."""
    if not isinstance(
        outcome, Continue | Done | WaitForInput | SleepUntil | Fail | WaitForChildren
    ):
        return (
            f"the step returned {type(outcome).__name__}; return ctx.next(), ctx.done(), "
            "ctx.ask(), ctx.sleep(), ctx.wait_for() or ctx.fail()"
        )
    if isinstance(outcome, Done):
        if outcome.result is None:
            return "the result of ctx.done() must not be None"
        return _check_json(outcome.result, "result")
    if isinstance(outcome, Continue | WaitForInput | SleepUntil | WaitForChildren):
        problem = _check_json(outcome.state, "state")
        if problem:
            return problem
    if isinstance(outcome, WaitForInput):
        try:
            Draft202012Validator.check_schema(dict(outcome.schema))
        except SchemaError as exc:
            return f"the input schema of ctx.ask() is not a JSON Schema: {exc.message}"
        return _check_json({"prompt": outcome.prompt, "schema": outcome.schema}, "input request")
    if isinstance(outcome, SleepUntil) and outcome.wake_at.tzinfo is None:
        return "ctx.sleep_until() needs a timezone-aware datetime"
    return None
