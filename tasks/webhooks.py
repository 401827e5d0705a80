"""The webhook Celery tasks: one delivery attempt, and the beat's retry sweep.

``outlast.deliver_webhook`` runs on the ``webhooks`` queue, so a slow receiver never
delays agent steps; ``outlast.sweep.webhooks`` is routed to ``maintenance`` by the
``outlast.sweep.*`` route and only queues messages, it never sends.
"""

from __future__ import annotations

from celery import shared_task

from app.store import messages
from app.webhooks import sender


@shared_task(name=messages.DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    """Make one attempt of ``delivery_id`` if it is due (a duplicate message is a no-op)."""
    return sender.attempt_delivery(delivery_id)


@shared_task(name=messages.SWEEP_WEBHOOKS, ignore_result=True)
def sweep_webhooks() -> int:
    """Queue a delivery attempt for every due retry (claimed with SKIP LOCKED)."""
    return sender.dispatch_due()
