"""The webhook Celery tasks: one delivery attempt, and the beat's retry sweep.

``outlast.deliver_webhook`` runs on the ``webhooks`` queue, so a slow receiver never
delays agent steps; ``outlast.sweep.webhooks`` is routed to ``maintenance`` by the
``outlast.sweep.*`` route and only queues messages, it never sends.
"""

from __future__ import annotations

import logging

from celery import shared_task

from app.store import db_errors, messages
from app.webhooks import sender
from tasks.sweeps import run_sweep

log = logging.getLogger(__name__)


@shared_task(name=messages.DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    """Make one attempt of ``delivery_id`` if it is due (a duplicate message is a no-op).
    With the database down the attempt cannot be claimed or recorded: a warning, not a
    traceback. The delivery stays due and the retry sweep sends it once the database is
    back (a send whose answer could not be recorded is sent again: at least once)."""
    try:
        return sender.attempt_delivery(delivery_id)
    except Exception as exc:
        if not db_errors.is_database_unavailable(exc):
            raise
        log.warning("webhook delivery %s postponed: database unavailable: %s", delivery_id, exc)
        return "postponed"


@shared_task(name=messages.SWEEP_WEBHOOKS, ignore_result=True)
def sweep_webhooks() -> int:
    """Queue a delivery attempt for every due retry (claimed with SKIP LOCKED)."""
    return run_sweep("webhooks", sender.dispatch_due)
