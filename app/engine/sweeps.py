"""The beat's sweeps: what each one does to the database (``tasks/sweeps.py`` runs them
as Celery tasks on the ``maintenance`` queue).

Every sweep claims its rows with ``SELECT … FOR UPDATE SKIP LOCKED`` inside one
transaction and changes them through :mod:`app.store.lifecycle`, so two beats (or two workers
running the same sweep) never process a row twice. Step messages they need are written
to the outbox in the same transaction and published right after the commit.

- ``reap``: expired leases (a lost worker) → attempt + 1 and a new step message, or
  ``failed``/``worker_lost`` at ``OUTLAST_MAX_ATTEMPTS`` (``compensating`` first when
  calls are owed undos); a lost undo step of a ``compensating`` task is always sent
  again (its undos' tries are bounded, not its attempts);
- ``relay_outbox``: publish outbox rows whose fast-path publish did not happen;
- ``wake_timers``: due durable timers, step-retry and undo backoffs → a step message;
- ``expire_deadlines``: tasks past ``timeout_seconds`` → ``failed``/``timeout`` (a
  ``compensating`` task is not failed again: its undos run to the end);
- ``redispatch_lost``: runnable tasks whose step message seems lost → a new message
  (a parent waiting for its children has no step queued and is not counted);
- ``wake_parents``: parents waiting for children whose condition holds → their next
  step (the backstop of the wake-up in the child's terminal transaction);
- ``expire_keys``: forget Idempotency-Keys past their TTL;
- ``purge_old_tasks``: delete acknowledged tasks ``OUTLAST_TASK_RETENTION_DAYS`` after
  their acknowledgement (and unacknowledged ones per ``OUTLAST_UNACKED_RETENTION_DAYS``),
  in short batches looped up to a time budget.
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from celery import current_app as celery_app
from sqlalchemy.engine import Connection

from app import settings as settings_mod
from app.ops import metrics
from app.store import children, db, db_errors, lifecycle, messages, outbox, retention

log = logging.getLogger(__name__)

# Rows one sweep run handles at most; the next run (seconds later) takes the rest.
BATCH = 500


# --- reaper -----------------------------------------------------------------------------


def reap_expired_leases(limit: int = BATCH) -> int:
    """Resume or fail every task whose step lease expired (its worker is presumed lost).

    Not within one lease of the database server's start: while it was down nobody could
    renew a lease, so every lease may have run out with its worker alive; the workers'
    retries take their leases back within a quarter of a lease once it is up (V2.md 8: an
    outage costs no attempt), and a lease nobody takes back is reaped a lease later.
    """
    cfg = settings_mod.current()
    max_attempts = cfg.max_attempts
    with db.transaction() as conn:
        task_ids = (
            conn.execute(
                sa.text(
                    "SELECT id FROM tasks WHERE lease_token IS NOT NULL "
                    "AND lease_expires_at < now() AND status IN ('working', 'compensating') "
                    "AND pg_postmaster_start_time() < now() - make_interval(secs => :lease) "
                    "ORDER BY lease_expires_at LIMIT :limit FOR UPDATE SKIP LOCKED"
                ),
                {"limit": limit, "lease": cfg.lease_seconds},
            )
            .scalars()
            .all()
        )
        for task_id in task_ids:
            reclaimed = lifecycle.reclaim_expired_lease(conn, task_id, max_attempts)
            if reclaimed is not None and reclaimed[0] == "retried":
                outbox.add_step(conn, task_id, reclaimed[1]["step"])
            if reclaimed is not None:
                db.after_commit(conn, metrics.lease_reaped, reclaimed[0])
                # The sweep's one INFO line counts them (tasks/sweeps.py); this is the detail.
                log.debug(
                    "reaped the expired lease of %s: %s",
                    task_id,
                    reclaimed[0],
                    extra={"task_id": task_id},
                )
    return len(task_ids)


# --- outbox relay -----------------------------------------------------------------------


# --- durable timers ---------------------------------------------------------------------


def wake_due_timers(limit: int = BATCH) -> int:
    """Enqueue the next step of every task whose ``wake_at`` has come (sleep timers and
    step-retry backoffs)."""
    with db.transaction() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id FROM tasks WHERE wake_at IS NOT NULL AND wake_at <= now() "
                "AND status IN ('pending', 'working', 'compensating') "
                "ORDER BY wake_at LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"limit": limit},
        ).all()
        for (task_id,) in rows:
            woken = lifecycle.wake(conn, task_id)
            if woken is not None:
                outbox.add_step(conn, task_id, woken["step"])
    return len(rows)


# --- parents waiting for children ----------------------------------------------------------


def wake_waiting_parents(limit: int = BATCH) -> int:
    """Queue the next step of every parent whose ``ctx.wait_for`` condition holds but
    which is still waiting: its child's terminal transaction could not wake it (the
    parent row was busy and the process died before the retry after its commit). Each
    wake is guarded, so a wake-up that raced this sweep happens once. Returns how many
    were woken."""
    return sum(children.wake_if_ready(parent_id) for parent_id in children.ready_parents(limit))


# --- deadlines --------------------------------------------------------------------------


def expire_task_deadlines(limit: int = BATCH) -> int:
    """Fail every active task past its ``timeout_seconds`` with ``timeout``."""
    with db.transaction() as conn:
        task_ids = (
            conn.execute(
                sa.text(
                    "SELECT id FROM tasks WHERE deadline_at IS NOT NULL AND deadline_at <= now() "
                    "AND status IN ('pending', 'working', 'input_required') "
                    "ORDER BY deadline_at LIMIT :limit FOR UPDATE SKIP LOCKED"
                ),
                {"limit": limit},
            )
            .scalars()
            .all()
        )
        for task_id in task_ids:
            lifecycle.fail_timeout(conn, task_id)
    return len(task_ids)


# --- lost step messages -----------------------------------------------------------------


def lost_after_seconds(cfg: settings_mod.Settings) -> float:
    """How long a queued step may go unclaimed before its message counts as possibly
    lost: 3 reaper intervals, at least 5 s (30 s with the defaults)."""
    return max(5.0, 3 * cfg.reaper_interval_seconds)


def _queued_step_messages(queues: list[str]) -> dict[str, int]:
    """Messages waiting in each of ``queues`` (not counting ones a worker holds)."""
    with celery_app.connection_for_read() as connection:
        channel = connection.default_channel
        return {q: channel.queue_declare(queue=q).message_count for q in queues}


def redispatch_lost_messages(limit: int = BATCH) -> int:
    """Send a new step message for runnable tasks that hold no lease and whose message
    seems lost (Redis flushed or restarted without persistence, a worker killed after it
    took the message but before it took the lease).

    The flood guard, per agent version (each has its own queue): a task waiting behind
    other messages is not lost, it is queued. So for each ``(agent, version)`` at most
    ``idle - queued`` messages are re-sent, where ``idle`` counts its runnable tasks
    without a lease, timer or outbox row, and ``queued`` is the length of its queue
    (messages still in the legacy ``steps`` queue count against the total); the
    oldest-dispatched idle tasks go first (FIFO: their messages would have been taken
    first). With every worker down for an hour, or a version that no worker has for
    days, the queue still holds one message per idle task and nothing is re-sent; after
    a Redis flush everything idle for :func:`lost_after_seconds` is re-sent once.
    Duplicates are fenced anyway.
    """
    cfg = settings_mod.current()
    outbox.sent_rows.flush()  # rows of messages this process already sent are not "coming"
    with db.transaction() as conn:
        idle = _count_idle(conn)
        if not idle:
            return 0
        queue_of = {pair: messages.step_queue(*pair) for pair in idle}
        try:
            queued = _queued_step_messages([messages.STEPS_QUEUE, *queue_of.values()])
        except Exception as exc:  # broker down: nothing can be sent anyway
            log.warning("lost-message sweep skipped: broker unavailable: %s", exc)
            return 0
        legacy = queued[messages.STEPS_QUEUE]  # not yet re-routed: counted once, in order
        sent = 0
        for pair, count in sorted(idle.items()):
            missing = count - queued[queue_of[pair]]
            covered = min(max(missing, 0), legacy)
            legacy -= covered
            missing -= covered
            if missing <= 0 or sent >= limit:
                continue
            rows = conn.execute(
                sa.text(
                    "SELECT id, step FROM tasks t "
                    "WHERE status IN ('pending', 'working', 'compensating') "
                    "AND agent = :agent AND agent_version = :version "
                    "AND lease_token IS NULL AND wake_at IS NULL AND waiting_for IS NULL "
                    "AND (dispatched_at IS NULL "
                    "     OR dispatched_at < now() - make_interval(secs => :after)) "
                    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id = t.id) "
                    "ORDER BY dispatched_at NULLS FIRST LIMIT :limit FOR UPDATE SKIP LOCKED"
                ),
                {
                    "agent": pair[0],
                    "version": pair[1],
                    "after": lost_after_seconds(cfg),
                    "limit": min(limit - sent, missing),
                },
            ).all()
            for task_id, step in rows:
                conn.execute(
                    sa.text("UPDATE tasks SET dispatched_at = now() WHERE id = :id"),
                    {"id": task_id},
                )
                outbox.add_step(conn, task_id, step)
            sent += len(rows)
    return sent


def _count_idle(conn: Connection) -> dict[tuple[str, str], int]:
    rows = conn.execute(
        sa.text(
            "SELECT agent, agent_version, count(*) AS n FROM tasks t "
            "WHERE status IN ('pending', 'working', 'compensating') "
            "AND lease_token IS NULL AND wake_at IS NULL AND waiting_for IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id = t.id) "
            "GROUP BY agent, agent_version"
        )
    ).all()
    return {(r.agent, r.agent_version): int(r.n) for r in rows}


# --- expiry and retention ---------------------------------------------------------------


def expire_idempotency_keys(limit: int = 5000) -> int:
    """Forget Idempotency-Keys past their ``expires_at``."""
    with db.transaction() as conn:
        return conn.execute(
            sa.text(
                "DELETE FROM idempotency_keys WHERE (tenant_id, key) IN ("
                "  SELECT tenant_id, key FROM idempotency_keys WHERE expires_at <= now() "
                "  LIMIT :limit FOR UPDATE SKIP LOCKED)"
            ),
            {"limit": limit},
        ).rowcount


# The purge (V2.md 4) runs batches until nothing is due or its time budget is spent; beat
# starts it every 10 s (workers/beat.py). Each batch is its own short transaction whose
# size adapts to keep it near PURGE_BATCH_TARGET_SECONDS, so the rows it locks (the
# purged tasks, their Idempotency-Keys) are held for milliseconds.
PURGE_BUDGET_SECONDS = 5.0
PURGE_BATCH_TARGET_SECONDS = 0.03
PURGE_BATCH_MAX = 200
# A batch that would wait longer than this for a lock gives up (and the run ends).
PURGE_LOCK_TIMEOUT_MS = 100

# Acknowledged tasks, OUTLAST_TASK_RETENTION_DAYS after acknowledged_at (tasks_acknowledged).
_ACKNOWLEDGED_DUE = sa.text(
    "SELECT id FROM tasks WHERE acknowledged_at < now() - make_interval(days => :days) "
    "ORDER BY acknowledged_at LIMIT :limit FOR UPDATE SKIP LOCKED"
)
# Unacknowledged terminal tasks, OUTLAST_UNACKED_RETENTION_DAYS after finished_at
# (tasks_unacknowledged_finished; the predicate is spelled as the index's).
_UNACKNOWLEDGED_DUE = sa.text(
    "SELECT id FROM tasks WHERE acknowledged_at IS NULL "
    "AND status IN ('completed', 'failed', 'cancelled') "
    "AND finished_at < now() - make_interval(days => :days) "
    "ORDER BY finished_at LIMIT :limit FOR UPDATE SKIP LOCKED"
)


def purge_batch(due: sa.TextClause, days: int, limit: int) -> int:
    """Delete up to ``limit`` tasks that ``due`` selects, with every row about them, in
    one transaction; returns how many."""
    with db.transaction() as conn:
        conn.execute(sa.text(f"SET LOCAL lock_timeout = '{PURGE_LOCK_TIMEOUT_MS}ms'"))
        task_ids = conn.execute(due, {"days": days, "limit": limit}).scalars().all()
        return retention.delete_rows(conn, task_ids)


def purge_old_tasks(
    budget_seconds: float = PURGE_BUDGET_SECONDS, batch_max: int = PURGE_BATCH_MAX
) -> int:
    """The retention purge: acknowledged tasks ``OUTLAST_TASK_RETENTION_DAYS`` after
    their acknowledgement, and, when ``OUTLAST_UNACKED_RETENTION_DAYS`` is set,
    unacknowledged terminal tasks that long after they finished. Returns how many tasks
    were deleted (their events, checkpoints, tool calls, deliveries and keys with them).
    """
    cfg = settings_mod.current()
    rules = [(_ACKNOWLEDGED_DUE, cfg.task_retention_days)]
    if cfg.unacked_retention_days > 0:
        rules.append((_UNACKNOWLEDGED_DUE, cfg.unacked_retention_days))
    deadline = time.monotonic() + budget_seconds
    purged, limit = 0, min(20, batch_max)
    try:
        for due, days in rules:
            while time.monotonic() < deadline:
                started = time.monotonic()
                deleted = purge_batch(due, days, limit)
                purged += deleted
                if deleted < limit:
                    break  # nothing more is due under this rule
                took = time.monotonic() - started
                if took > PURGE_BATCH_TARGET_SECONDS:
                    limit = max(1, limit // 2)
                elif took < PURGE_BATCH_TARGET_SECONDS / 2:
                    limit = min(batch_max, limit * 2)
    except sa.exc.OperationalError as exc:
        if db_errors.sqlstate(exc) != db_errors.LOCK_NOT_AVAILABLE:
            raise
        log.info("purge run ended early: a row it needs is locked (next run retries)")
    finally:
        if purged:
            metrics.tasks_deleted("retention", purged)
    return purged
