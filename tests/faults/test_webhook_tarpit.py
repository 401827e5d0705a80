"""Guarantee (V2.md 8 and 12): a webhook receiver that accepts and then trickles bytes
cannot hold a send past ``OUTLAST_WEBHOOK_TIMEOUT_SECONDS`` of wall-clock time, takes at
most ``OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT`` sends at once, and never slows other
tenants' steps or deliveries.

The tarpit is a real socket server answering one byte a second; the stack is the
Procfile's web, worker and beat.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import TEST_ENV
from tests.faults.conftest import Client, new_tenant, query
from tests.faults.tarpit import Tarpit
from tests.harness import wait_until

pytestmark = pytest.mark.faults

TIMEOUT = float(TEST_ENV["OUTLAST_WEBHOOK_TIMEOUT_SECONDS"])
PER_TENANT = 2
# The machine running the suite is small and loaded.
MARGIN = 2.0


@pytest.fixture
def tarpit():
    t = Tarpit()
    yield t
    t.close()


def test_tarpit_receiver_is_cut_off_at_the_timeout_and_other_tenants_keep_going(
    stack, procs, ledger, watcher, database_url, tarpit
):
    # Given the stack, a tenant whose receiver is a tarpit and a tenant with a good one
    stack.env["OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT"] = str(PER_TENANT)
    slow, good = new_tenant(database_url), new_tenant(database_url)
    procs.start("web", "worker", "beat")
    slow_api = Client(stack.base_url, slow.api_key)
    good_api = Client(stack.base_url, good.api_key)
    watcher.start(database_url, stack.base_url, good.api_key)

    # When the slow tenant's tasks finish and their deliveries go to the tarpit
    slow_tasks = [
        slow_api.create("echo", {"message": f"slow {i}"}, webhook_url=tarpit.url)["id"]
        for i in range(8)
    ]
    slow_api.wait_all_terminal(slow_tasks, timeout=60)
    wait_until(lambda: tarpit.open_now() >= PER_TENANT, 30, what="sends held by the tarpit")

    # Then the other tenant's steps and deliveries go on meanwhile
    started = time.monotonic()
    good_tasks = [
        good_api.create(
            "echo", {"message": f"good {i}", "steps": 2}, webhook_url=ledger.url + "/hooks"
        )["id"]
        for i in range(6)
    ]
    for task_id in good_tasks:
        watcher.track(task_id)
    done = good_api.wait_all_terminal(good_tasks, timeout=30)
    assert {d["status"] for d in done.values()} == {"completed"}, done
    wait_until(
        lambda: {r.task_id for r in ledger.snapshot("/hooks")} >= set(good_tasks),
        20,
        what="the good tenant's webhooks delivered",
    )
    assert time.monotonic() - started < 30

    # and the tarpit keeps being tried (retries are scheduled, not lost) while each
    # attempt is cut off at the timeout and the tenant never has more sends in flight
    # than its cap
    wait_until(lambda: len(tarpit.connections) >= 2 * PER_TENANT + 2, 40, what="more attempts")
    now = time.monotonic()
    for c in list(tarpit.connections):
        held = c.seconds if c.seconds is not None else now - c.accepted
        assert held <= TIMEOUT + MARGIN, f"a send held the tarpit for {held:.1f}s"
    assert tarpit.max_open <= PER_TENANT, tarpit.max_open
    attempts = query(
        database_url,
        "SELECT a.error, a.duration_ms FROM webhook_attempts a "
        "JOIN webhook_deliveries d ON d.id = a.delivery_id "
        "WHERE d.tenant_id = :t AND a.duration_ms IS NOT NULL",
        t=slow.tenant_id,
    )
    assert attempts, "no attempt to the tarpit was recorded"
    for a in attempts:
        assert "timeout" in a["error"], a
        assert a["duration_ms"] <= (TIMEOUT + 1.0) * 1000, a
    pending = query(
        database_url,
        "SELECT count(*) AS n FROM webhook_deliveries WHERE tenant_id = :t "
        "AND status = 'pending' AND next_attempt_at IS NOT NULL",
        t=slow.tenant_id,
    )
    assert pending[0]["n"] == len(slow_tasks)
