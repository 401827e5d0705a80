"""The beat schedule: every periodic sweep, at the intervals of the settings.

Beat only schedules; every sweep is a Celery task on the ``maintenance`` queue that
claims its rows with ``FOR UPDATE SKIP LOCKED``, so a second beat changes nothing.
"""

from __future__ import annotations

from typing import Any

from app.settings import Settings

# The retention purge's period (its batches and time budget: app.engine.sweeps).
PURGE_INTERVAL_SECONDS = 10.0


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Sweep name -> Celery beat entry. Each message expires after two of its intervals:
    with every worker down, the next sweep supersedes it instead of piling up."""
    reap = settings.reaper_interval_seconds
    every = {
        "reap-expired-leases": ("outlast.sweep.reap", reap),
        "relay-outbox": ("outlast.sweep.relay_outbox", min(reap, 2.0)),
        "wake-timers": ("outlast.sweep.wake_timers", min(reap, 1.0)),
        "wake-parents": ("outlast.sweep.wake_parents", reap),
        "expire-deadlines": ("outlast.sweep.expire_deadlines", reap),
        "redispatch-lost": ("outlast.sweep.redispatch_lost", reap),
        "webhook-retries": ("outlast.sweep.webhooks", settings.webhook_sweep_seconds),
        "expire-idempotency-keys": ("outlast.sweep.expire_keys", reap),
        # Often, and each run loops short batches up to a time budget: the purge keeps up
        # with 100 tasks finishing a second (app.engine.sweeps.purge_old_tasks).
        "purge-old-tasks": ("outlast.sweep.purge", PURGE_INTERVAL_SECONDS),
    }
    return {
        name: {"task": task, "schedule": interval, "options": {"expires": max(2 * interval, 2.0)}}
        for name, (task, interval) in every.items()
    }
