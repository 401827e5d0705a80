"""The beat schedule: every periodic sweep, at the intervals of the settings.

Beat only schedules; every sweep is a Celery task on the ``maintenance`` queue that
claims its rows with ``FOR UPDATE SKIP LOCKED``, so a second beat changes nothing.
"""

from __future__ import annotations

from typing import Any

from app.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    reap = settings.reaper_interval_seconds
    return {
        "reap-expired-leases": {"task": "outlast.sweep.reap", "schedule": reap},
        "relay-outbox": {"task": "outlast.sweep.relay_outbox", "schedule": min(reap, 2.0)},
        "wake-timers": {"task": "outlast.sweep.wake_timers", "schedule": min(reap, 1.0)},
        "expire-deadlines": {"task": "outlast.sweep.expire_deadlines", "schedule": reap},
        "redispatch-lost": {"task": "outlast.sweep.redispatch_lost", "schedule": reap},
        "webhook-retries": {
            "task": "outlast.sweep.webhooks",
            "schedule": settings.webhook_sweep_seconds,
        },
        "expire-idempotency-keys": {"task": "outlast.sweep.expire_keys", "schedule": reap},
        "purge-old-tasks": {"task": "outlast.sweep.purge", "schedule": 3600.0},
    }
