"""Guarantee (V2.md 12): a worker SIGKILLed while undoing — the undo is finished by
another worker with the same key; each undo lands once.

A ``calls`` task with ``compensate`` fails at its third call, so its first two calls
are owed undos (``DELETE`` of the ledger's URL, ``Idempotency-Key: <key>-undo``),
call 2's first. The ledger holds the second undo (call 1's) open, and the worker making
it is SIGKILLed with its whole process group. The reaper clears the lost lease and the
other worker makes that undo again with the same key, without repeating call 2's
completed undo; the task ends ``failed`` with both undone and its original error, and
the status watcher sees no regression.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import Client, new_tenant, query
from tests.faults.ledger import Request

pytestmark = pytest.mark.faults

LEASE = 3.0  # conftest TEST_ENV
REAPER = 1.0
HOLD = 60.0  # the held undo stays open until its worker dies (or the test ends)


def _undo_of(task_id: str, step: int, after: int = -1):
    def found(requests: list[Request]) -> Request | None:
        return next(
            (
                r
                for r in requests
                if r.method == "DELETE"
                and r.task_id == task_id
                and r.step == step
                and r.seq > after
            ),
            None,
        )

    return found


def test_sigkilled_worker_while_undoing_another_worker_finishes_the_undo_with_the_same_key(
    stack, procs, ledger, watcher, database_url
):
    # Given web, beat and two workers, and a calls task with compensate failing at call 3
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.add_rule(lambda r: r.method == "DELETE" and r.step == 0, delay=HOLD, times=1)
    task = api.create(
        "calls",
        {"url": ledger.url + "/calls", "calls": 3, "compensate": True, "fail_at_call": 3},
    )
    watcher.track(task["id"])

    # When the worker making the second undo (call 1's) is SIGKILLed while it is held open
    held = ledger.wait_for(_undo_of(task["id"], 0), timeout=30, what="the second undo")
    assert held.answered is None
    compensating = api.get(task["id"])
    assert compensating["status"] == "compensating"
    assert compensating["compensation"] == {
        "reason": "failed",
        "total": 2,
        "done": 1,
        "failed": 0,
    }
    killed_at = procs.kill(procs.holder_of(held))

    # Then the other worker makes that undo again, with the same key, within lease +
    # reaper interval
    again = ledger.wait_for(
        _undo_of(task["id"], 0, after=held.seq), timeout=30, what="the undo made again"
    )
    recovery = again.arrived - killed_at
    print(f"FIGURE undo_kill_recovery_seconds={recovery:.2f}")
    assert recovery <= LEASE + REAPER + 5.0, f"resumed after {recovery:.1f}s"
    assert again.key == held.key
    procs.spawn("worker")  # the killed worker comes back, as a platform would restart it

    # And the task ends failed, with its original error, both calls undone
    done = api.wait_terminal(task["id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "agent_error"
    assert done["compensation"] == {"reason": "failed", "total": 2, "done": 2, "failed": 0}
    assert done["attempt"] == 2  # one worker was lost

    calls = ledger.snapshot("/calls", task["id"])
    posts = {r.step: r.key for r in calls if r.method == "POST"}
    assert sorted(posts) == [0, 1]
    deletes = [r for r in calls if r.method == "DELETE"]
    # call 2's undo once (completed before the kill: not repeated), then call 1's twice
    # (killed, then finished) with one key
    assert [(r.step, r.key) for r in deletes] == [
        (1, posts[1] + "-undo"),
        (0, posts[0] + "-undo"),
        (0, posts[0] + "-undo"),
    ]
    assert held.key == posts[0] + "-undo"
    # each undo landed once: one success per key (the killed worker's request got none)
    answered_ok = [r.key for r in deletes if r.status == 200]
    assert sorted(answered_ok) == sorted([posts[1] + "-undo", posts[0] + "-undo"])
    # and the log holds one completed undo per call, the interrupted one tried twice
    rows = query(
        database_url,
        "SELECT step_index, status, attempts, idempotency_key FROM tool_calls "
        "WHERE task_id = :t AND kind = 'compensation' ORDER BY step_index",
        t=task["id"],
    )
    assert [dict(r) for r in rows] == [
        {"step_index": 0, "status": "completed", "attempts": 2, "idempotency_key": held.key},
        {"step_index": 1, "status": "completed", "attempts": 1, "idempotency_key": deletes[0].key},
    ]
    events = [e["type"] for e in api.events(task["id"])]
    assert events.count("task.compensating") == 1 and events[-1] == "task.failed"
