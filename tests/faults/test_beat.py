"""Guarantees about the beat scheduler.

RUNTIME.md: "beat down: webhook retries, reaping and timers pause and catch up when it
returns; running steps are unaffected" and "a second ``beat`` started by mistake: no
duplicate sweeps or deliveries". The ledger plays the customer's webhook receiver,
counting requests per ``webhook-id``.
"""

from __future__ import annotations

import collections
import time

import pytest

from tests.faults.conftest import Client, new_tenant, queue_outstanding
from tests.faults.ledger import Request
from tests.harness import wait_until

pytestmark = pytest.mark.faults


def hooks_by_event(requests: list[Request]) -> dict[str, list[Request]]:
    by_event: dict[str, list[Request]] = collections.defaultdict(list)
    for r in requests:
        by_event[r.key].append(r)
    return dict(by_event)


def delivered(requests: list[Request]) -> bool:
    return any(r.status is not None and 200 <= r.status < 300 for r in requests)


def test_webhook_retries_and_timers_pause_while_beat_is_down_and_resume_when_it_returns(
    stack, procs, ledger, watcher, database_url, redis_url
):
    # Given a receiver that fails every delivery, and tasks whose completion it is sent
    failing = ledger.add_rule(lambda r: r.path.startswith("/hooks"), status=503)
    tenant = new_tenant(database_url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    tasks = [
        api.create("echo", {"message": f"hook {i}"}, webhook_url=ledger.url + "/hooks")["id"]
        for i in range(2)
    ]
    for task_id in tasks:
        watcher.track(task_id)
    done = api.wait_all_terminal(tasks, timeout=30)
    assert {d["status"] for d in done.values()} == {"completed"}
    event_ids = {
        t: next(e["id"] for e in api.events(t) if e["type"] == "task.completed") for t in tasks
    }
    # and that beat has already retried each a few times
    ledger.wait_for(
        lambda rs: all(len(hooks_by_event(rs).get(e, [])) >= 3 for e in event_ids.values()),
        timeout=30,
        what="three attempts per event",
    )

    # When beat stops
    procs.stop(beat)
    # what beat queued before it stopped still goes out; wait until it has
    wait_until(lambda: queue_outstanding(redis_url, "webhooks") == 0, 20, what="queue drained")
    paused = ledger.counts("/hooks")
    # and, while it is down, a task making tool calls and a task with a timer are submitted
    calls = api.create("calls", {"url": ledger.url + "/calls", "calls": 3})["id"]
    sleepy = api.create("sleepy", {"seconds": 1})["id"]
    watcher.track(calls)
    watcher.track(sleepy)

    # Then running steps are unaffected: the calls task runs to the end without beat
    assert api.wait_terminal(calls, timeout=30)["status"] == "completed"
    time.sleep(3.0)
    # but webhook retries and the timer pause, though both are due
    assert ledger.counts("/hooks") == paused, "webhook retries went on without beat"
    assert {d["status"] for t in tasks for d in api.deliveries(t)} == {"pending"}
    assert api.get(sleepy)["status"] == "working", "the timer fired without beat"

    # When the receiver recovers and beat comes back
    failing.times = failing.used  # no more failures
    procs.start("beat")

    # Then every delivery is retried and delivered, once
    ledger.wait_for(
        lambda rs: all(delivered(hooks_by_event(rs).get(e, [])) for e in event_ids.values()),
        timeout=30,
        what="deliveries after beat returned",
    )
    # and the timer catches up
    assert api.wait_terminal(sleepy, timeout=30)["result"] == {"slept": 1}
    time.sleep(2.0)
    by_event = hooks_by_event(ledger.snapshot("/hooks"))
    for task_id, event_id in event_ids.items():
        attempts = by_event[event_id]
        assert [r.status for r in attempts].count(200) == 1, [r.status for r in attempts]
        assert attempts[-1].status == 200
        (delivery,) = api.deliveries(task_id)
        assert delivery["event_id"] == event_id
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == len(attempts)


def test_two_beats_do_not_duplicate_sweeps_or_deliveries(
    stack, procs, ledger, watcher, database_url
):
    # Given two beats (one started by mistake) and a receiver that fails 4 times per event
    failures = 4
    ledger.fail_first_per_key("/hooks", failures, status=500)
    tenant = new_tenant(database_url)
    web, worker = procs.start("web", "worker")
    # At DEBUG, where beat's "Sending due task" lines for sweeps are (an idle stack is quiet)
    beat_a, beat_b = procs.start("beat", "beat", extra_env={"OUTLAST_LOG_LEVEL": "DEBUG"})
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)

    # When tasks with webhooks, tool calls and a durable timer run under both
    hooked = [
        api.create("echo", {"message": f"twice {i}"}, webhook_url=ledger.url + "/hooks")["id"]
        for i in range(4)
    ]
    calls = api.create("calls", {"url": ledger.url + "/calls", "calls": 3, "step_seconds": 0.3})
    sleepy = api.create("sleepy", {"seconds": 2})
    everything = hooked + [calls["id"], sleepy["id"]]
    for task_id in everything:
        watcher.track(task_id)
    done = api.wait_all_terminal(everything, timeout=60)
    assert {d["status"] for d in done.values()} == {"completed"}, done
    event_ids = [
        next(e["id"] for e in api.events(t) if e["type"] == "task.completed") for t in hooked
    ]
    ledger.wait_for(
        lambda rs: all(delivered(hooks_by_event(rs).get(e, [])) for e in event_ids),
        timeout=60,
        what="every webhook delivered",
    )
    time.sleep(3.0)  # both beats keep sweeping a while longer

    # Then each event was attempted exactly failures + 1 times, one delivery per event
    by_event = hooks_by_event(ledger.snapshot("/hooks"))
    assert set(by_event) == set(event_ids)
    for task_id, event_id in zip(hooked, event_ids, strict=True):
        statuses = [r.status for r in by_event[event_id]]
        assert statuses == [500] * failures + [200], (event_id, statuses)
        (delivery,) = api.deliveries(task_id)
        assert (delivery["status"], delivery["attempts"]) == ("delivered", failures + 1)
    # each tool call was made once, and the timer woke its task once
    counts = ledger.counts("/calls", calls["id"])
    assert len(counts) == 3 and set(counts.values()) == {1}, counts
    sleepy_events = [e["type"] for e in api.events(sleepy["id"])]
    assert sleepy_events.count("task.completed") == 1
    assert sleepy_events.count("task.step.completed") == done[sleepy["id"]]["step"]
    assert done[sleepy["id"]]["result"] == {"slept": 2}
    # and both beats really were scheduling the sweeps all along
    for beat in (beat_a, beat_b):
        assert beat.alive()
        assert "outlast.sweep.webhooks" in beat.log_text(), beat.log_text()[-2000:]
