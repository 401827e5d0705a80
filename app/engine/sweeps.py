"""The beat's sweeps: what each one does to the database (``tasks/sweeps.py`` runs them
as Celery tasks on the ``maintenance`` queue).

Every sweep claims its rows with ``SELECT … FOR UPDATE SKIP LOCKED`` inside one
transaction and changes them through :mod:`app.store.lifecycle`, so two beats (or two workers
running the same sweep) never process a row twice. Step messages they need are written
to the outbox in the same transaction and published right after the commit.

- ``reap``: expired leases (a lost worker) → attempt + 1 and a new step message, or
  ``failed``/``worker_lost`` at ``OUTLAST_MAX_ATTEMPTS``;
- ``relay_outbox``: publish outbox rows whose fast-path publish did not happen;
- ``wake_timers``: due durable timers and step-retry backoffs → a step message;
- ``expire_deadlines``: tasks past ``timeout_seconds`` → ``failed``/``timeout``;
- ``redispatch_lost``: runnable tasks whose step message seems lost → a new message;
- ``expire_keys``: forget Idempotency-Keys past their TTL;
- ``purge``: delete terminal tasks older than ``OUTLAST_TASK_RETENTION_DAYS``.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from celery import current_app as celery_app
from sqlalchemy.engine import Connection

from app import settings as settings_mod
from app.ops import metrics
from app.store import db, lifecycle, messages, outbox

log = logging.getLogger(__name__)

# Rows one sweep run handles at most; the next run (seconds later) takes the rest.
BATCH = 500


# --- reaper -----------------------------------------------------------------------------


def reap_expired_leases(limit: int = BATCH) -> int:
    """Resume or fail every task whose step lease expired (its worker is presumed lost)."""
    max_attempts = settings_mod.current().max_attempts
    with db.transaction() as conn:
        task_ids = (
            conn.execute(
                sa.text(
                    "SELECT id FROM tasks WHERE lease_token IS NOT NULL "
                    "AND lease_expires_at < now() AND status = 'working' "
                    "ORDER BY lease_expires_at LIMIT :limit FOR UPDATE SKIP LOCKED"
                ),
                {"limit": limit},
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
                "AND status IN ('pending', 'working') "
                "ORDER BY wake_at LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"limit": limit},
        ).all()
        for (task_id,) in rows:
            woken = lifecycle.wake(conn, task_id)
            if woken is not None:
                outbox.add_step(conn, task_id, woken["step"])
    return len(rows)


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
                    "SELECT id, step FROM tasks t WHERE status IN ('pending', 'working') "
                    "AND agent = :agent AND agent_version = :version "
                    "AND lease_token IS NULL AND wake_at IS NULL "
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
            "WHERE status IN ('pending', 'working') "
            "AND lease_token IS NULL AND wake_at IS NULL "
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


def purge_old_tasks(limit: int = 1000) -> int:
    """Delete terminal tasks finished more than ``OUTLAST_TASK_RETENTION_DAYS`` ago (their
    events, checkpoints, tool calls and deliveries go with them)."""
    days = settings_mod.current().task_retention_days
    with db.transaction() as conn:
        return conn.execute(
            sa.text(
                "DELETE FROM tasks WHERE id IN ("
                "  SELECT id FROM tasks WHERE status IN ('completed', 'failed', 'cancelled') "
                "  AND finished_at < now() - make_interval(days => :days) "
                "  LIMIT :limit FOR UPDATE SKIP LOCKED)"
            ),
            {"days": days, "limit": limit},
        ).rowcount
