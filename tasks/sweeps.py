"""The beat's sweeps as Celery tasks on the ``maintenance`` queue (thin wrappers over
:mod:`app.engine.sweeps`, which says what each one does).

Every sweep claims its rows with ``SELECT … FOR UPDATE SKIP LOCKED``, so two beats (or
two workers running the same sweep) never process a row twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import shared_task

from app.engine import sweeps
from app.store import db_errors, messages, outbox

log = logging.getLogger(__name__)


# What a sweep that acted did, said once at INFO ("reaped 2 expired leases"); a sweep
# that found nothing says so at DEBUG only, so an idle stack writes no line.
DID = {
    "reap": ("reaped %d expired lease", "reaped %d expired leases"),
    "relay_outbox": ("relayed %d outbox message", "relayed %d outbox messages"),
    "wake_timers": ("woke %d task whose timer was due", "woke %d tasks whose timers were due"),
    "wake_parents": (
        "woke %d task whose children were done",
        "woke %d tasks whose children were done",
    ),
    "expire_deadlines": ("failed %d task past its deadline", "failed %d tasks past their deadline"),
    "redispatch_lost": (
        "re-sent %d step message that seemed lost",
        "re-sent %d step messages that seemed lost",
    ),
    "expire_keys": ("forgot %d expired idempotency key", "forgot %d expired idempotency keys"),
    "purge": ("purged %d task past retention", "purged %d tasks past retention"),
    "webhooks": ("queued %d due webhook delivery", "queued %d due webhook deliveries"),
}


def run_sweep(name: str, work: Callable[[], int]) -> int:
    """Run one sweep; a database outage is logged, not raised (beat tries again soon)."""
    try:
        done = work()
    except Exception as exc:
        if db_errors.is_database_unavailable(exc):
            log.warning("sweep %s skipped: database unavailable: %s", name, exc)
            return 0
        raise
    if done:
        one, many = DID[name]
        log.info(one if done == 1 else many, done)
    else:
        log.debug("sweep %s: nothing to do", name)
    return done


@shared_task(name=messages.SWEEP_REAP, ignore_result=True)
def reap() -> int:
    """Beat: the stuck-task reaper."""
    return run_sweep("reap", sweeps.reap_expired_leases)


@shared_task(name=messages.SWEEP_RELAY_OUTBOX, ignore_result=True)
def relay_outbox() -> int:
    """Beat: publish outbox rows the fast path left behind."""
    return run_sweep("relay_outbox", outbox.relay_due)


@shared_task(name=messages.SWEEP_WAKE_TIMERS, ignore_result=True)
def wake_timers() -> int:
    """Beat: wake due timers."""
    return run_sweep("wake_timers", sweeps.wake_due_timers)


@shared_task(name=messages.SWEEP_WAKE_PARENTS, ignore_result=True)
def wake_parents() -> int:
    """Beat: the backstop of child tasks' wake-ups."""
    return run_sweep("wake_parents", sweeps.wake_waiting_parents)


@shared_task(name=messages.SWEEP_EXPIRE_DEADLINES, ignore_result=True)
def expire_deadlines() -> int:
    """Beat: the task deadline."""
    return run_sweep("expire_deadlines", sweeps.expire_task_deadlines)


@shared_task(name=messages.SWEEP_REDISPATCH_LOST, ignore_result=True)
def redispatch_lost() -> int:
    """Beat: re-send lost step messages."""
    return run_sweep("redispatch_lost", sweeps.redispatch_lost_messages)


@shared_task(name=messages.SWEEP_EXPIRE_KEYS, ignore_result=True)
def expire_keys() -> int:
    """Beat: expire Idempotency-Keys."""
    return run_sweep("expire_keys", sweeps.expire_idempotency_keys)


@shared_task(name=messages.SWEEP_PURGE, ignore_result=True)
def purge() -> int:
    """Beat: the retention purge."""
    return run_sweep("purge", sweeps.purge_old_tasks)
