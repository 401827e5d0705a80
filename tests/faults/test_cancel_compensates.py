"""Cancel during a long tool call of a task with something to undo (V2.md 5), with the
Procfile's processes: ``202`` ``compensating`` at once, no call but the undos after it,
the call in flight undone too once it completes, then ``cancelled``."""

from __future__ import annotations

import pytest

from tests.faults.conftest import Client, new_tenant

pytestmark = pytest.mark.faults

HOLD = 3.0  # the third call stays open this long: the cancel lands inside it


def test_cancel_during_call_3_compensates_calls_3_2_1_then_cancels(
    stack, procs, ledger, watcher, database_url
):
    # Given web, beat and a worker, and a calls task with compensate whose third call hangs
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.hold_call(step=2, seconds=HOLD, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 5, "compensate": True})
    watcher.track(task["id"])
    held = ledger.wait_in_flight(task["id"], step=2)

    # When it is cancelled during that call
    answer = api.cancel(task["id"])

    # Then the answer is 202 with the task compensating (calls 1 and 2 owed so far)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "compensating"
    assert body["compensation"] == {"reason": "cancelled", "total": 2, "done": 0, "failed": 0}
    again = api.cancel(task["id"])
    assert again.status_code == 200 and again.json()["status"] in ("compensating", "cancelled")

    # And it ends cancelled with calls 3, 2 and 1 undone, newest first, once each
    done = api.wait_terminal(task["id"], timeout=60)
    assert done["status"] == "cancelled", done
    assert done["error"] is None
    assert done["compensation"] == {"reason": "cancelled", "total": 3, "done": 3, "failed": 0}
    calls = ledger.snapshot("/calls", task["id"])
    posts = {r.step: r.key for r in calls if r.method == "POST"}
    assert sorted(posts) == [0, 1, 2]  # no call started after the cancel
    assert held.key == posts[2]
    deletes = [(r.step, r.key) for r in calls if r.method == "DELETE"]
    assert deletes == [(s, posts[s] + "-undo") for s in (2, 1, 0)]
    events = [e["type"] for e in api.events(task["id"])]
    assert events.count("task.compensating") == 1 and events[-1] == "task.cancelled"
