"""A receiver's ``Retry-After`` is its own text: a value Outlast cannot read (``²``,
which ``str.isdigit`` accepts; a date in year 99999999999) must not escape the
attempt's error handling. The attempt is recorded with its status and the usual backoff."""

from __future__ import annotations

import pytest

from app.webhooks.sender import parse_retry_after
from tests.harness import wait_until
from tests.webhooks.helpers import attempts, deliveries, finish_task
from tests.webhooks.receiver import Answer

BAD_VALUES = ("²", "Fri, 31 Dec 99999999999 23:59:59 GMT", "9" * 400, "Mon, 99 Foo 2026")


@pytest.mark.parametrize("value", BAD_VALUES)
def test_unreadable_retry_after_is_no_retry_after(value):
    assert parse_retry_after(value) is None


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_RETRY_BASE_SECONDS="0.1")
def test_unreadable_retry_after_is_recorded_as_a_failed_attempt_with_backoff(
    tenant, celery_worker, beat, make_receiver
):
    receivers = [
        make_receiver(lambda n, v=value: Answer(503, {"Retry-After": v}) if n == 0 else Answer(200))
        for value in BAD_VALUES[:2]
    ]
    task_ids = [finish_task(tenant.tenant_id, r.url) for r in receivers]

    for task_id in task_ids:
        rows = wait_until(
            lambda t=task_id: [r for r in deliveries(t) if r["status"] == "delivered"] or None,
            20,
            what="delivered on the retry",
        )
        first, second = attempts(rows[0]["id"])[:2]
        assert first["status_code"] == 503 and first["error"] == "HTTP 503", first
        assert first["retry_at"] is not None, first
        assert second["status_code"] == 200
