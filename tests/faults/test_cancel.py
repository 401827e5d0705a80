"""Guarantee: cancelling during a long tool call stops the task for good.

RUNTIME.md: "cancel during a long tool call: status is ``cancelled`` at once; the step's
late output is discarded; no further tool call starts".
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Client, new_tenant, query

pytestmark = pytest.mark.faults

LONG_CALL = 5.0
LEASE = 3.0
REAPER = 1.0


def test_cancel_during_a_long_tool_call_discards_its_output_and_starts_no_other_call(
    stack, procs, ledger, watcher, database_url
):
    # Given a calls task whose second call takes a long time
    tenant = new_tenant(database_url)
    procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.hold_call(step=1, seconds=LONG_CALL, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 4})
    watcher.track(task["id"])
    held = ledger.wait_in_flight(task["id"], step=1)

    # When it is cancelled while that call runs
    response = api.cancel(task["id"])

    # Then it is cancelled at once
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert api.get(task["id"])["status"] == "cancelled"
    assert held.answered is None, "the call should still be running"
    cancelled = api.get(task["id"])

    # and when the call returns late, its output is discarded and nothing else starts
    ledger.wait_for(lambda rs: held.answered is not None, LONG_CALL + 5, what="the late answer")
    time.sleep(LEASE + 2 * REAPER)  # long enough for a next step or a reaped re-run
    calls = ledger.snapshot("/calls", task["id"])
    assert [r.step for r in calls] == [0, 1], [r.step for r in calls]
    final = api.get(task["id"])
    assert final == cancelled
    assert (final["status"], final["step"], final["result"]) == ("cancelled", 1, None)
    checkpoints = query(
        database_url, "SELECT step_index FROM checkpoints WHERE task_id = :t", t=task["id"]
    )
    assert [r["step_index"] for r in checkpoints] == [0]
    events = api.events(task["id"])
    assert events[-1]["type"] == "task.cancelled"
    assert [e["type"] for e in events].count("task.step.completed") == 1
