"""Guarantee: a worker SIGKILLed mid-step loses nothing.

RUNTIME.md: "the task resumes from its last checkpoint on a live worker within lease +
reaper interval; completed tool calls are not repeated; the interrupted one is repeated
with the same key; ``attempt`` grows by one" and "losing the worker during attempt
``OUTLAST_MAX_ATTEMPTS`` fails the task with ``worker_lost``".

Each kill is SIGKILL of the worker's whole process group (the Celery main process and
its pool children) while the ledger holds the ``calls`` agent's request open, so the
kill lands in the middle of a tool call, the worst place for it.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Client, new_tenant, query
from tests.faults.ledger import Ledger, Request
from tests.faults.watcher import TERMINAL
from tests.harness import wait_until

pytestmark = pytest.mark.faults

LEASE = 3.0  # conftest TEST_ENV
REAPER = 1.0
HOLD = 60.0  # a held call stays open until the worker dies (or the test ends)


def assert_one_key_per_step(ledger: Ledger, task_id: str, calls: int) -> dict[int, str]:
    """Every step sent exactly one key (a re-run reuses its key); returns them."""
    by_step = ledger.call_keys_by_step(task_id)
    assert sorted(by_step) == list(range(calls)), by_step
    for step, keys in by_step.items():
        assert len(keys) == 1, f"step {step} sent different keys: {keys}"
    keys = {step: next(iter(k)) for step, k in by_step.items()}
    assert len(set(keys.values())) == calls, "two steps shared a key"
    return keys


def test_sigkilled_worker_resumes_on_live_worker_repeating_only_the_interrupted_call(
    stack, procs, ledger, watcher, database_url
):
    # Given web, beat and two workers, and a calls task whose third call hangs
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.hold_call(step=2, seconds=HOLD, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 5, "step_seconds": 0.2})
    watcher.track(task["id"])

    # When the worker making that call is SIGKILLed (its whole process group)
    held = ledger.wait_in_flight(task["id"], step=2)
    assert api.get(task["id"])["status"] == "working"
    killed_at = procs.kill(procs.holder_of(held))

    # Then the other worker re-runs the interrupted call within lease + reaper interval
    rerun = ledger.wait_for(
        lambda rs: next(
            (r for r in rs if r.task_id == task["id"] and r.step == 2 and r.seq > held.seq), None
        ),
        timeout=30,
        what="the interrupted call re-made",
    )
    recovery = rerun.arrived - killed_at
    print(f"FIGURE worker_kill_recovery_seconds={recovery:.2f}")
    assert recovery <= LEASE + REAPER + 5.0, f"resumed after {recovery:.1f}s"
    procs.spawn("worker")  # and the killed worker comes back, as a platform would restart it

    done = api.wait_terminal(task["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["result"] == {"calls": 5, "statuses": [200] * 5}
    assert done["attempt"] == 2
    # Every key reached the ledger; only the call in flight at the kill came twice
    keys = assert_one_key_per_step(ledger, task["id"], 5)
    counts = ledger.counts("/calls", task["id"])
    assert rerun.key == held.key == keys[2]
    assert {k: counts[k] for k in keys.values()} == {
        keys[s]: (2 if s == 2 else 1) for s in range(5)
    }
    # and the checkpoints were not redone
    steps = query(
        database_url,
        "SELECT step_index, attempt FROM checkpoints WHERE task_id = :t ORDER BY step_index",
        t=task["id"],
    )
    assert [(r["step_index"], r["attempt"]) for r in steps] == [
        (0, 1),
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 2),
    ]


def test_task_survives_three_worker_kills_and_completes(
    stack, procs, ledger, watcher, database_url
):
    # Given a calls task whose calls 1, 2 and 3 each hang the first time they are made
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    for step in (1, 2, 3):
        ledger.hold_call(step=step, seconds=HOLD, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 5})
    watcher.track(task["id"])

    # When the worker making each of those calls is killed, and restarted every time
    for step in (1, 2, 3):
        held = ledger.wait_in_flight(task["id"], step=step, timeout=45)
        procs.kill(procs.holder_of(held))
        assert api.get(task["id"])["status"] == "working"
        procs.spawn("worker")

    # Then the task completes, on its fourth attempt, each interrupted call made twice
    done = api.wait_terminal(task["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["attempt"] == 4
    keys = assert_one_key_per_step(ledger, task["id"], 5)
    counts = ledger.counts("/calls", task["id"])
    assert {s: counts[keys[s]] for s in range(5)} == {0: 1, 1: 2, 2: 2, 3: 2, 4: 1}


def test_losing_the_worker_in_every_allowed_attempt_fails_the_task_with_worker_lost(
    stack, procs, ledger, watcher, database_url
):
    # Given OUTLAST_MAX_ATTEMPTS=2 and a call that hangs every time it is made
    max_attempts = 2
    stack.env["OUTLAST_MAX_ATTEMPTS"] = str(max_attempts)
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.hold_call(step=0, seconds=HOLD, times=None)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 2})
    watcher.track(task["id"])

    # When the worker is killed inside the call more times than attempts are allowed
    def next_call_or_end(made: int) -> Request | str | None:
        calls = ledger.snapshot("/calls", task["id"])
        if len(calls) > made and calls[-1].answered is None:
            return calls[-1]
        return "terminal" if api.get(task["id"])["status"] in TERMINAL else None

    kills = 0
    for _ in range(max_attempts + 1):
        made = len(ledger.snapshot("/calls", task["id"]))
        held = wait_until(lambda made=made: next_call_or_end(made), 30, 0.1)
        if held == "terminal":
            break  # nothing runs the task any more: the extra kill has nothing to hit
        procs.kill(procs.holder_of(held))
        kills += 1
        procs.spawn("worker")

    # Then the task fails with worker_lost after the last allowed attempt, not stuck
    done = api.wait_terminal(task["id"], timeout=30)
    assert kills == max_attempts
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "worker_lost"
    assert done["attempt"] == max_attempts
    assert done["result"] is None
    # and with a live worker nothing touches it again
    time.sleep(LEASE + 2 * REAPER)
    assert api.get(task["id"]) == done
    assert len(ledger.snapshot("/calls", task["id"])) == max_attempts
    assert api.events(task["id"])[-1]["type"] == "task.failed"
