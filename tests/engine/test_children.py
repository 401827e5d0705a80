"""Child tasks (V2.md section 6) and the ``fanout`` agent (V2.md 10) with a real
in-process worker, and the wake-up race between a child's terminal transaction and its
parent's checkpoint, played out on two real connections."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
import redis as redis_lib
import sqlalchemy as sa

from app.engine import children as engine_children
from app.engine import runner, sweeps
from app.store import children as store_children
from app.store import db, ids, lifecycle
from outlast import WaitForChildren
from tests.engine.conftest import TEST_AGENTS
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until

CHILD_AGENTS = "tests.engine.child_agents"


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "OUTLAST_AGENTS": f"{TEST_AGENTS},{CHILD_AGENTS}"}


def child_rows(tasks, parent_id: str):
    return tasks.rows(
        "SELECT id, status::text AS status, parent_id, spawn_key, input, result, tenant_id "
        "FROM tasks WHERE parent_id = :p ORDER BY created_at, id",
        p=parent_id,
    )


def test_fanout_of_five_echo_children_completes_with_their_results_in_input_order(
    celery_worker, tasks
):
    # Given five echo inputs that finish in another order than they were given
    seconds = [0.9, 0.1, 0.6, 0.0, 0.3]
    inputs = [{"message": f"m{i}", "step_seconds": s} for i, s in enumerate(seconds)]

    # When a fanout runs them
    parent_id = tasks.submit("fanout", {"agent": "echo", "inputs": inputs})

    # Then while the children run, the parent waits, working, holding no lease or timer
    def waiting():
        row = tasks.get(parent_id)
        return row if row["status"] == "working" and row["step"] == 1 else None

    row = wait_until(waiting, 20, 0.02, what="the parent waiting")
    held = tasks.rows(
        "SELECT lease_token, wake_at, waiting_for FROM tasks WHERE id = :id", id=parent_id
    )[0]
    if tasks.get(parent_id)["status"] == "working":
        assert held["lease_token"] is None and held["wake_at"] is None
    done = tasks.wait_status(parent_id, "completed", timeout=60)

    # And it completes with the children's results in input order
    kids = child_rows(tasks, parent_id)
    assert [k["spawn_key"] for k in kids] == [f"0:{i}" for i in range(5)]
    assert [k["input"]["message"] for k in kids] == [f"m{i}" for i in range(5)]
    assert done["result"] == {
        "children": [k["id"] for k in kids],
        "statuses": ["completed"] * 5,
        "results": [{"message": f"m{i}", "steps": 1} for i in range(5)],
    }
    assert {k["tenant_id"] for k in kids} == {done["tenant_id"]}
    assert done["step"] == 2 and done["attempt"] == 1
    assert row is not None
    # Each child is a task like any other, with its own events
    assert tasks.event_types(kids[0]["id"])[0] == "task.created"
    assert tasks.event_types(kids[0]["id"])[-1] == "task.completed"


def test_fanout_any_completes_after_the_first_child_and_leaves_the_others_running(
    celery_worker, tasks
):
    # Given one quick echo child and two that take 20 s
    inputs = [
        {"message": "slow-1", "step_seconds": 20},
        {"message": "quick"},
        {"message": "slow-2", "step_seconds": 20},
    ]

    # When a fanout in mode "any" runs them
    parent_id = tasks.submit("fanout", {"agent": "echo", "inputs": inputs, "mode": "any"})
    started = time.monotonic()
    done = tasks.wait_status(parent_id, "completed", timeout=15)

    # Then it completes after the quick child, long before the others
    assert time.monotonic() - started < 15
    result = done["result"]
    assert result["statuses"][1] == "completed"
    assert result["results"][1] == {"message": "quick", "steps": 1}
    assert result["statuses"][0] in ("pending", "working")
    assert result["statuses"][2] in ("pending", "working")
    assert result["results"][0] is None and result["results"][2] is None
    kids = child_rows(tasks, parent_id)
    assert [k["id"] for k in kids] == result["children"]
    # (the others are still running; stop them so that the worker stops promptly)
    with db.transaction() as conn:
        for kid in kids:
            lifecycle.cancel(conn, kid["id"], kid["tenant_id"])


def test_cancelling_a_parent_cancels_its_children_and_grandchildren_in_the_same_transaction(
    celery_worker, tasks
):
    # Given a fanout of two fanouts, each with two long echo children
    grandchild = {"message": "long", "step_seconds": 60}
    nested = {"agent": "echo", "inputs": [grandchild, grandchild]}
    parent_id = tasks.submit("fanout", {"agent": "fanout", "inputs": [nested, nested]})

    def tree_running():
        kids = child_rows(tasks, parent_id)
        grand = [g for k in kids for g in child_rows(tasks, k["id"])]
        running = [g for g in grand if g["status"] == "working"]
        return (kids, grand) if len(kids) == 2 and len(running) == 4 else None

    kids, grand = wait_until(tree_running, 30, 0.05, what="four grandchildren working")

    # When the parent is cancelled
    with db.transaction() as conn:
        row = lifecycle.cancel(conn, parent_id, tasks.tenant_id)
    assert row is not None and row["status"] == "cancelled"

    # Then, as soon as that commits, every descendant is cancelled too
    statuses = {r["id"]: tasks.get(r["id"])["status"] for r in [*kids, *grand]}
    assert set(statuses.values()) == {"cancelled"}, statuses
    for task_id in [parent_id, *statuses]:
        assert tasks.event_types(task_id)[-1] == "task.cancelled"
        assert tasks.event_types(task_id).count("task.cancelled") == 1


def test_a_rerun_of_the_spawning_step_finds_the_same_children(celery_worker, tasks):
    # Given an agent that spawns two children and then fails transiently once
    parent_id = tasks.submit("test_spawn_rerun", {})

    def finished():
        sweeps.wake_due_timers()  # the beat's timer sweep runs the retried step
        return tasks.get(parent_id)["status"] in ("completed", "failed")

    wait_until(finished, 30, 0.1, what="the parent finished")
    done = tasks.get(parent_id)

    # Then the re-run returned the same ids: two children exist, not four
    assert done["status"] == "completed", done["error"]
    kids = child_rows(tasks, parent_id)
    assert len(kids) == 2
    assert done["result"] == {"ids": [k["id"] for k in kids], "all": [k["id"] for k in kids]}
    assert "task.retrying" in tasks.event_types(parent_id)


def test_a_rerun_that_spawns_other_input_fails_nondeterministic_replay(celery_worker, tasks):
    parent_id = tasks.submit("test_spawn_changes", {})

    def finished():
        sweeps.wake_due_timers()
        return tasks.get(parent_id)["status"] in ("completed", "failed")

    wait_until(finished, 30, 0.1, what="the parent finished")
    done = tasks.get(parent_id)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "nondeterministic_replay"
    assert len(child_rows(tasks, parent_id)) == 1


def test_a_refused_child_raises_spawn_refused_with_the_errors_of_a_422(celery_worker, tasks):
    parent_id = tasks.submit("test_spawn_refused", {})
    done = tasks.wait_status(parent_id, ("completed", "failed"))
    assert done["status"] == "completed", done["error"]
    refused = done["result"]["refused"]
    assert set(refused["echo"]) == {"input.message", "input.steps"}
    assert refused["no_such_agent"] == {"agent": ["Unknown agent 'no_such_agent'."]}
    assert done["result"]["children"] == []
    assert child_rows(tasks, parent_id) == []


def test_waiting_for_a_task_that_is_not_a_child_fails_invalid_output(celery_worker, tasks):
    other = tasks.submit("echo", {"message": "not yours"})
    parent_id = tasks.submit("test_wait_for_stranger", {"other": other})
    done = tasks.wait_status(parent_id, ("completed", "failed"))
    assert done["status"] == "failed"
    assert done["error"]["type"] == "invalid_output"
    assert other in done["error"]["message"]


def test_a_wait_whose_children_are_already_done_runs_the_next_step_at_once(celery_worker, tasks):
    # No beat runs here: only the checkpoint itself can queue the next step.
    parent_id = tasks.submit("test_wait_after_done", {})
    done = tasks.wait_status(parent_id, ("completed", "failed"), timeout=30)
    assert done["status"] == "completed", done["error"]
    assert done["result"] == {"child": {"message": "quick", "steps": 1}}


# --- the wake-up race, on two connections ---------------------------------------------------


def _leased_parent_with_child(tasks) -> tuple[str, str, str, str]:
    """A fanout parent holding step 0's lease with one spawned echo child, which holds
    its own step 0 lease. (parent, parent token, child, child token)"""
    parent_id = tasks.submit("fanout", {"agent": "echo", "inputs": [{"message": "x"}]})
    token = ids.new_token()
    with db.transaction() as conn:
        assert lifecycle.acquire_lease(conn, parent_id, 0, token, 30)
    child_id = engine_children.spawn(
        parent_id=parent_id,
        step=0,
        index=0,
        token=token,
        agent_name="echo",
        input={"message": "x"},
        metadata=None,
    )
    child_token = ids.new_token()
    with db.transaction() as conn:
        assert lifecycle.acquire_lease(conn, child_id, 0, child_token, 30)
    return parent_id, token, child_id, child_token


def _finish_child(child_id: str, token: str) -> None:
    with db.transaction() as conn:
        assert lifecycle.commit_step(
            conn,
            child_id,
            0,
            token,
            state=None,
            started_at=datetime.now(UTC),
            attempt=1,
            dispatch=False,
        )
        assert lifecycle.complete(conn, child_id, {"message": "x", "steps": 1})


def _blocked_on_a_lock(tasks) -> bool:
    return bool(
        tasks.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
    )


@pytest.mark.parametrize("first", ["parent", "child"])
def test_a_child_finishing_while_its_parent_checkpoints_its_wait_wakes_the_parent_once(
    tasks, redis_url, first
):
    # Given a parent about to checkpoint ctx.wait_for([child]) and the child finishing
    parent_id, token, child_id, child_token = _leased_parent_with_child(tasks)
    errors: list[BaseException] = []

    def parent_checkpoint(hold: threading.Event | None) -> None:
        try:
            with db.transaction() as conn:
                result = engine_children.commit_wait(
                    conn,
                    parent_id,
                    0,
                    token,
                    WaitForChildren((child_id,), "all", {"children": [child_id]}),
                    started_at=datetime.now(UTC),
                    attempt=1,
                )
                outcomes.append(result)
                if hold is not None:
                    hold.wait(10)  # the child's transaction runs meanwhile
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    outcomes: list[str] = []
    if first == "parent":
        # When the parent's checkpoint (not yet committed) has checked the condition,
        # and the child's terminal transaction runs before that commit
        hold = threading.Event()
        t = threading.Thread(target=parent_checkpoint, args=(hold,))
        t.start()
        wait_until(lambda: outcomes, 10, 0.01, what="the parent's check")
        child = threading.Thread(target=_finish_child, args=(child_id, child_token))
        child.start()
        wait_until(lambda: _blocked_on_a_lock(tasks), 10, 0.02, what="the child waiting")
        hold.set()
        t.join(10)
        child.join(10)
        # Then the parent's check did not see the child, but the child woke it
        assert outcomes == ["waiting"]
    else:
        # When the child's terminal transaction commits just before the checkpoint
        _finish_child(child_id, child_token)
        parent_checkpoint(None)
        # Then the checkpoint saw it and queued the next step itself
        assert outcomes == ["continued"]
    assert errors == []
    row = tasks.rows(
        "SELECT waiting_for, dispatched_at, step, status::text AS status FROM tasks WHERE id = :id",
        id=parent_id,
    )[0]
    assert row["waiting_for"] is None, "the wake-up was lost"
    assert row["dispatched_at"] is not None and row["step"] == 1
    assert row["status"] == "working"
    # And the backstop sweep finds nothing left to wake
    assert sweeps.wake_waiting_parents() == 0


def test_the_sweep_wakes_a_parent_whose_wake_up_was_lost(tasks, redis_url):
    # Given a waiting parent
    parent_id, token, child_id, child_token = _leased_parent_with_child(tasks)
    with db.transaction() as conn:
        outcome = engine_children.commit_wait(
            conn,
            parent_id,
            0,
            token,
            WaitForChildren((child_id,), "all", None),
            started_at=datetime.now(UTC),
            attempt=1,
        )
    assert outcome == "waiting"

    # And its child finishing while another transaction holds the parent row, in a
    # process that dies before its retry after the commit (the retry is dropped here)
    hold = db.engine().connect()
    held = hold.begin()
    hold.execute(sa.text("SELECT 1 FROM tasks WHERE id = :id FOR NO KEY UPDATE"), {"id": parent_id})
    try:
        with db.transaction() as conn:
            assert lifecycle.commit_step(
                conn,
                child_id,
                0,
                child_token,
                state=None,
                started_at=datetime.now(UTC),
                attempt=1,
                dispatch=False,
            )
            assert lifecycle.complete(conn, child_id, {"ok": True})
            callbacks = db.state(conn).after_commit
            retries = [args[0] for cb, args in callbacks if cb is store_children.wake_if_ready]
            callbacks[:] = [
                (cb, a) for cb, a in callbacks if cb is not store_children.wake_if_ready
            ]
    finally:
        held.rollback()
        hold.close()
    assert retries == [parent_id]
    waiting = tasks.rows("SELECT waiting_for FROM tasks WHERE id = :id", id=parent_id)[0]
    assert waiting["waiting_for"] == {"ids": [child_id], "mode": "all"}

    # When the backstop sweep runs
    woken = sweeps.wake_waiting_parents()

    # Then it wakes the parent, once
    assert woken == 1
    row = tasks.rows("SELECT waiting_for, dispatched_at FROM tasks WHERE id = :id", id=parent_id)[0]
    assert row["waiting_for"] is None and row["dispatched_at"] is not None
    assert sweeps.wake_waiting_parents() == 0


# --- with compensation (V2.md 5) ------------------------------------------------------------


def _terminal_with_timers(tasks, task_id: str, timeout: float = 60.0):
    def terminal():
        sweeps.wake_due_timers()  # no beat here: undo backoffs and in-flight waits
        row = tasks.get(task_id)
        return row if row["status"] in lifecycle.TERMINAL else None

    return wait_until(terminal, timeout, interval=0.1, what=f"{task_id} terminal")


def test_a_child_that_fails_and_compensates_wakes_its_parent_once_it_ends_failed(
    celery_worker, tasks
):
    # Given a fanout whose second calls child undoes its first call and fails at its second
    server = LocalServer(lambda request: json_answer(200, {"ok": True}))
    try:
        inputs = [
            {"url": server.url, "calls": 1},
            {"url": server.url, "calls": 3, "compensate": True, "fail_at_call": 2},
        ]
        parent_id = tasks.submit("fanout", {"agent": "calls", "inputs": inputs})
        done = _terminal_with_timers(tasks, parent_id)
    finally:
        server.close()

    # Then the parent waited for the compensation to end, and its child's failure did
    # not fail it
    assert done["status"] == "completed", done["error"]
    assert done["result"]["statuses"] == ["completed", "failed"]
    failed = tasks.get(done["result"]["children"][1])
    assert failed["compensation"] == {"reason": "failed", "total": 1, "done": 1, "failed": 0}
    assert "task.compensating" in tasks.event_types(failed["id"])


def test_cancelling_a_parent_compensates_each_child_with_calls_to_undo(
    celery_worker, tasks, client, auth
):
    # Given a fanout of two calls children with compensate, each with a call made and
    # its next call held open
    release = threading.Event()

    def callee(request):
        if request.method == "POST" and request.json["step"] == 1:
            release.wait(30)
        return json_answer(200, {"ok": True})

    server = LocalServer(callee)
    try:
        child = {"url": server.url, "calls": 3, "compensate": True}
        parent_id = tasks.submit("fanout", {"agent": "calls", "inputs": [child, child]})

        def both_in_call_2():
            with server._lock:
                steps = [(r.json["task_id"], r.json["step"]) for r in server.requests]
            return len({t for t, s in steps if s == 1}) == 2

        wait_until(both_in_call_2, 30, 0.05, what="both children in their second call")

        # When the parent is cancelled
        answer = client.post(f"/v1/tasks/{parent_id}/cancel", headers=auth)
        assert answer.status_code == 200 and answer.get_json()["status"] == "cancelled"

        # Then each child goes through its compensation and ends cancelled
        kids = child_rows(tasks, parent_id)
        assert {tasks.get(k["id"])["status"] for k in kids} == {"compensating"}
        release.set()
        ended = [_terminal_with_timers(tasks, k["id"]) for k in kids]
    finally:
        release.set()
        server.close()
    assert [k["status"] for k in ended] == ["cancelled", "cancelled"]
    assert all(k["compensation"]["reason"] == "cancelled" for k in ended)
    assert all(k["compensation"]["done"] == k["compensation"]["total"] >= 1 for k in ended)
    with server._lock:
        deletes = [r for r in server.requests if r.method == "DELETE"]
    assert len(deletes) == sum(k["compensation"]["total"] for k in ended)


def test_a_waiting_parent_gets_no_step_message_and_a_stray_one_runs_nothing(
    flask_app, tasks, redis_url
):
    # Given a parent waiting for a running child, idle for an hour, its queue empty
    parent_id, token, child_id, _ = _leased_parent_with_child(tasks)
    with db.transaction() as conn:
        outcome = engine_children.commit_wait(
            conn,
            parent_id,
            0,
            token,
            WaitForChildren((child_id,), "all", None),
            started_at=datetime.now(UTC),
            attempt=1,
        )
    assert outcome == "waiting"
    tasks.scalar(
        "UPDATE tasks SET dispatched_at = now() - interval '1 hour' WHERE id = :id RETURNING 1",
        id=parent_id,
    )
    redis_lib.Redis.from_url(redis_url).flushall()

    # Then the lost-message sweep sends it nothing (it has no step queued)
    assert sweeps.redispatch_lost_messages() == 0
    # And a stray message for its next step takes no lease and runs nothing
    assert runner.run_step(parent_id, 1) == "skipped"
    row = tasks.rows(
        "SELECT lease_token, step, waiting_for FROM tasks WHERE id = :id", id=parent_id
    )[0]
    assert row["lease_token"] is None and row["step"] == 1
    assert row["waiting_for"] == {"ids": [child_id], "mode": "all"}
