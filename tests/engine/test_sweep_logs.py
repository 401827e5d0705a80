"""What the sweeps say: one INFO line when one acted ("reaped 2 expired leases"),
DEBUG only when it found nothing (an idle stack writes no line at INFO). The sweep tasks
run as the worker runs them (their function, on real PostgreSQL and Redis)."""

from __future__ import annotations

import logging

from app import settings as settings_mod
from app.store import db
from tasks import sweeps as sweep_tasks
from tasks import webhooks as webhook_tasks
from tests.api.conftest import closed_port_url
from tests.engine.test_sweeps import take_lease_and_vanish

SWEEP_TASKS = (
    sweep_tasks.reap,
    sweep_tasks.relay_outbox,
    sweep_tasks.wake_timers,
    sweep_tasks.expire_deadlines,
    sweep_tasks.redispatch_lost,
    sweep_tasks.expire_keys,
    sweep_tasks.purge,
    sweep_tasks.wake_parents,
    webhook_tasks.sweep_webhooks,
)


def _said(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def test_a_sweep_that_acted_says_what_it_did_in_one_info_line(flask_app, tasks, caplog):
    # Given two tasks whose workers vanished mid-step
    for message in ("a", "b"):
        take_lease_and_vanish(tasks, tasks.submit("echo", {"message": message}))
    caplog.set_level(logging.DEBUG)

    # When the reaper runs
    assert sweep_tasks.reap() == 2

    # Then one line at INFO says what it did; the per-task detail is DEBUG
    assert _said(caplog, logging.INFO) == ["reaped 2 expired leases"]
    assert sum("reaped the expired lease of" in m for m in _said(caplog, logging.DEBUG)) == 2


def test_sweeps_that_found_nothing_write_nothing_at_info(flask_app, tasks, caplog):
    caplog.set_level(logging.DEBUG)

    for sweep in SWEEP_TASKS:
        assert sweep() == 0, sweep.name

    assert _said(caplog, logging.INFO) == []
    nothing = [m for m in _said(caplog, logging.DEBUG) if m.endswith(": nothing to do")]
    assert len(nothing) == len(SWEEP_TASKS)


def test_one_thing_done_is_said_in_the_singular(flask_app, tasks, caplog):
    take_lease_and_vanish(tasks, tasks.submit("echo", {"message": "c"}))
    caplog.set_level(logging.INFO)

    sweep_tasks.reap()

    assert _said(caplog, logging.INFO) == ["reaped 1 expired lease"]


def test_with_the_database_down_sweeps_and_deliveries_warn_once_and_raise_nothing(settings, caplog):
    # Given a database that refuses connections (nothing listens on its port)
    settings_mod.configure(settings.replace(database_url=closed_port_url()))
    db.dispose()
    caplog.set_level(logging.INFO)
    try:
        # When every sweep runs, and a webhook delivery is attempted
        done = [sweep() for sweep in SWEEP_TASKS]
        delivery = webhook_tasks.deliver_webhook("dlv_during_outage")
    finally:
        db.dispose()
        settings_mod.configure(settings)

    # Then nothing was done and nothing raised: one warning each, no traceback
    assert done == [0] * len(SWEEP_TASKS) and delivery == "postponed"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(SWEEP_TASKS) + 1
    assert all("database unavailable" in r.getMessage() and not r.exc_info for r in warnings)
    assert "dlv_during_outage" in warnings[-1].getMessage()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
