"""Deploying new agent code while old tasks run (V2.md section 7), with real processes.

Each "deploy" is a directory holding a module ``versioned_agents`` (written by the
test) that workers and the web import through ``OUTLAST_AGENTS``. docs/agents.md,
"Changing an agent while tasks run", points at these tests for its three cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from app.store import db, outbox
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODULE = "versioned_agents"

HEADER = """
from outlast import agent

SCHEMA = {"type": "object", "properties": {"item": {"type": "string"}, "url": {"type": "string"}}}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
"""

# Version 1: each agent asks a question in step 0 and finishes in step 1 with what its
# checkpoint holds ({"v1_items": [...]}).
V1 = (
    HEADER
    + """
MARK = {}

def _ask(ctx):
    return ctx.ask("ship it?", ANSWER, {"v1_items": [ctx.input.get("item", "x")]})

@agent("parcel", input_schema=SCHEMA)
def parcel(ctx, state):
    if ctx.step == 0:
        return _ask(ctx)
    return ctx.done({"ran_on": "1", "items": state["v1_items"], **MARK})

@agent("crate", input_schema=SCHEMA)
def crate(ctx, state):
    if ctx.step == 0:
        return _ask(ctx)
    return ctx.done({"ran_on": "1", "items": state["v1_items"]})

@agent("box", input_schema=SCHEMA)
def box(ctx, state):
    if ctx.step == 0:
        return _ask(ctx)
    return ctx.done({"ran_on": "1", "items": state["v1_items"]})

@agent("slow", input_schema=SCHEMA)
def slow(ctx, state):
    ctx.tool("http_post", url=ctx.input["url"], json={})
    return ctx.done({"ran_on": "1", "attempt": ctx.attempt})
"""
)

# The same version 1 with a compatible change (case 1: the version stays "1").
V1_COMPATIBLE = V1.replace("MARK = {}", 'MARK = {"compatible_change": True}')

# Version 2: the checkpoint is now {"items": [...]}. ``parcel`` has no migration (its
# v1 tasks need v1 workers), ``crate`` migrates from 1, ``box``'s migration raises.
V2 = (
    HEADER
    + """
def _ask(ctx):
    return ctx.ask("ship it?", ANSWER, {"items": [ctx.input.get("item", "x")]})

@agent("parcel", input_schema=SCHEMA, version="2")
def parcel(ctx, state):
    if ctx.step == 0:
        return _ask(ctx)
    return ctx.done({"ran_on": "2", "items": state["items"]})

@agent("crate", input_schema=SCHEMA, version="2")
def crate(ctx, state):
    if ctx.step == 0:
        return _ask(ctx)
    return ctx.done({"ran_on": "2", "items": state["items"]})

@crate.migrate(from_version="1")
def crate_from_v1(state, input):
    return {"items": state["v1_items"] + ["migrated"]}

@agent("box", input_schema=SCHEMA, version="2")
def box(ctx, state):
    return ctx.done({"ran_on": "2"})

@box.migrate(from_version="1")
def box_from_v1(state, input):
    raise ValueError("box checkpoints of version 1 cannot be read")

@agent("slow", input_schema=SCHEMA, version="2")
def slow(ctx, state):
    ctx.tool("http_post", url=ctx.input["url"], json={})
    return ctx.done({"ran_on": "2", "attempt": ctx.attempt})
"""
)


def write_code(tmp_path: Path, name: str, source: str) -> dict[str, str]:
    """One deploy's code: its directory on PYTHONPATH, its module in OUTLAST_AGENTS."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / f"{MODULE}.py").write_text(source)
    return {"PYTHONPATH": f"{directory}{os.pathsep}{ROOT}", "OUTLAST_AGENTS": MODULE}


NO_AGENT_CODE = {"PYTHONPATH": str(ROOT), "OUTLAST_AGENTS": ""}  # built-ins only


def start_workers(stack, *codes: dict[str, str]) -> list:
    """One worker per ``code``, started together (start-up costs seconds each here)."""
    workers = [
        stack.start("worker", extra_env={"OUTLAST_WORKER_CONCURRENCY": "1", **code})
        for code in codes
    ]
    for worker in workers:
        stack.wait_worker_ready(worker)
    return workers


def start_worker(stack, code: dict[str, str]):
    return start_workers(stack, code)[0]


def steps_run(worker, task_id: str) -> list[dict]:
    """The log lines of ``worker`` about running a step of ``task_id`` (JSON lines)."""
    found = []
    for line in worker.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("task_id") == task_id and record.get("celery_task") == "outlast.run_step":
            found.append(record)
    return found


def agents_check(env: dict[str, str], code: dict[str, str]) -> subprocess.Popen:
    """``outlast agents check`` started with ``code`` (the code a deploy would bring);
    ``.communicate()`` gives its output."""
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "agents", "check"],
        env={**os.environ, **env, **code},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(check: subprocess.Popen) -> tuple[int, list[str]]:
    """The exit code and output lines of an ``agents check``."""
    stdout, stderr = check.communicate(timeout=60)
    assert check.returncode in (0, 1), stderr
    return check.returncode, stdout.splitlines()


def test_a_deploy_never_runs_a_checkpoint_on_code_that_cannot_read_it(
    flask_app, stack, tasks, tenant, env, tmp_path
):
    v1 = write_code(tmp_path, "v1", V1)
    v1_compatible = write_code(tmp_path, "v1-compatible", V1_COMPATIBLE)
    v2 = write_code(tmp_path, "v2", V2)
    auth = {"Authorization": f"Bearer {tenant.api_key}"}

    # Given tasks of three agents parked in input_required on version 1
    stack.start("beat")
    old = start_worker(stack, v1)
    parked = {name: tasks.submit(name, {"item": name}) for name in ("parcel", "crate", "box")}
    parked["parcel_2"] = tasks.submit("parcel", {"item": "parcel_2"})
    for task_id in parked.values():
        tasks.wait_status(task_id, "input_required", 30)
    assert {tasks.get(t)["agent_version"] for t in parked.values()} == {"1"}

    # When every v1 worker is replaced by v2 code (parcel without a migration), next to a
    # worker of another team that has none of these agents, and a v2 web
    stack.stop(old)
    stack.start("web", extra_env=v2)
    new, other_team = start_workers(stack, v2, NO_AGENT_CODE)
    stack.wait_ready()
    api = stack.base_url + "/v1"
    for task_id in parked.values():
        answered = requests.post(
            f"{api}/tasks/{task_id}/input", json={"input": {"ok": True}}, headers=auth, timeout=10
        )
        assert answered.status_code == 202, answered.text

    # Then crate is migrated at its step boundary and completes on version 2
    crate = tasks.wait_status(parked["crate"], "completed", 30)
    assert crate["result"] == {"ran_on": "2", "items": ["crate", "migrated"]}
    assert crate["agent_version"] == "2"
    migrated = tasks.rows(
        "SELECT data FROM events WHERE task_id = :id AND type = 'task.migrated'", id=crate["id"]
    )
    assert len(migrated) == 1
    assert (migrated[0]["data"]["from_version"], migrated[0]["data"]["to_version"]) == ("1", "2")
    assert migrated[0]["data"]["task"]["agent_version"] == "2"

    # And box's migration raised: the task fails with agent_error naming the migration
    box = tasks.wait_status(parked["box"], "failed", 30)
    assert box["error"]["type"] == "agent_error"
    assert "versioned_agents.box_from_v1" in box["error"]["message"]
    assert "cannot be read" in box["error"]["message"]

    # And a message for parcel in the shared `steps` queue (as code from before the
    # routing would send) is handed on to its version's queue, not run
    with db.transaction() as conn:
        outbox.add(conn, "outlast.run_step", [parked["parcel"], 1], queue="steps")

    # And both parcel tasks wait, untouched: working, attempt 1, nothing failed or re-sent
    started = time.monotonic()
    checks = {"v2": agents_check(env, v2), "v1": agents_check(env, v1)}  # (used below)
    time.sleep(max(0.0, 6 - (time.monotonic() - started)))  # > the lost-message sweep's 5 s
    for key in ("parcel", "parcel_2"):
        waiting = tasks.get(parked[key])
        assert (waiting["status"], waiting["attempt"], waiting["step"]) == ("working", 1, 1)
        assert waiting["lease_token"] is None and waiting["agent_version"] == "1"
        assert tasks.event_types(parked[key])[-1] == "task.resumed"
        assert (
            tasks.scalar("SELECT count(*) FROM checkpoints WHERE task_id = :id", id=parked[key])
            == 1
        )
        # no worker ran it: the one that took the stray message only handed it on
        for worker in (new, other_team):
            outcomes = {
                line.get("data", {}).get("return_value") for line in steps_run(worker, parked[key])
            }
            assert outcomes <= {None, "'rerouted'"}, outcomes
    assert any(
        line.get("data", {}).get("return_value") == "'rerouted'"
        for worker in (new, other_team)
        for line in steps_run(worker, parked["parcel"])
    )

    # And `agents check` with the v2 code names the stranded version; with v1 code it passes
    assert finished(checks["v2"]) == (1, ["parcel 1: 2 tasks in flight"])
    assert finished(checks["v1"]) == (0, [])

    # And the v2 web's /v1/agents and /metrics show it
    listed = requests.get(f"{api}/agents", headers=auth, timeout=10).json()["data"]
    parcel = next(a for a in listed if a["name"] == "parcel")
    first, second = parcel["versions"]
    # (this web lacks v1's code: no schema; no live worker can run or migrate v1)
    assert first == {"version": "1", "input_schema": None, "tasks_in_flight": 2, "workers": 0}
    assert (second["version"], second["tasks_in_flight"], second["workers"]) == ("2", 0, 1)
    assert second["input_schema"]["properties"]["item"] == {"type": "string"}
    crate_versions = next(a for a in listed if a["name"] == "crate")["versions"]
    assert [(v["version"], v["workers"]) for v in crate_versions] == [("1", 1), ("2", 1)]
    scraped = requests.get(stack.base_url + "/metrics", timeout=10).text
    assert 'outlast_tasks_stranded{agent="parcel",version="1"} 2.0' in scraped

    # When a new parcel task is submitted to the v2 web
    created = requests.post(
        f"{api}/tasks", json={"agent": "parcel", "input": {"item": "new"}}, headers=auth, timeout=10
    )
    assert created.status_code == 202, created.text
    fresh = created.json()
    # Then it is pinned to version 2 and runs on the v2 worker
    assert fresh["agent_version"] == "2"
    tasks.wait_status(fresh["id"], "input_required", 30)
    requests.post(
        f"{api}/tasks/{fresh['id']}/input", json={"input": {"ok": True}}, headers=auth, timeout=10
    )
    assert tasks.wait_status(fresh["id"], "completed", 30)["result"]["ran_on"] == "2"

    # And a crate task of version 1 that had not started yet (no checkpoint) moves to
    # version 2 at its first step without a call to the migration
    unstarted = tasks.submit("crate", {"item": "late"})
    tasks.wait_status(unstarted, "input_required", 30)
    assert tasks.event_types(unstarted)[:3] == ["task.created", "task.started", "task.migrated"]
    requests.post(
        f"{api}/tasks/{unstarted}/input", json={"input": {"ok": True}}, headers=auth, timeout=10
    )
    late = tasks.wait_status(unstarted, "completed", 30)
    assert (late["agent_version"], late["result"]) == ("2", {"ran_on": "2", "items": ["late"]})

    # When version 1 comes back (with a compatible change: its version is still "1")
    start_worker(stack, v1_compatible)

    # Then the waiting parcel tasks complete on version 1, with the attempt they had
    for key in ("parcel", "parcel_2"):
        done = tasks.wait_status(parked[key], "completed", 30)
        assert done["result"] == {"ran_on": "1", "items": [key], "compatible_change": True}
        assert (done["attempt"], done["agent_version"]) == (1, "1")
        assert "task.failed" not in tasks.event_types(parked[key])
    # And nothing is in flight any more: the old code can go
    assert finished(agents_check(env, v2)) == (0, [])
    listed = requests.get(f"{api}/agents", headers=auth, timeout=10).json()["data"]
    parcel = next(a for a in listed if a["name"] == "parcel")
    assert [(v["version"], v["tasks_in_flight"]) for v in parcel["versions"]] == [
        ("1", 0),
        ("2", 0),
    ]
    scraped = requests.get(stack.base_url + "/metrics", timeout=10).text
    assert 'outlast_tasks_stranded{agent="parcel",version="1"}' not in scraped


class HeldOnce:
    """A callee whose first request hangs until the test ends (its worker is killed
    meanwhile); later requests answer at once."""

    def __init__(self):
        self.arrived = threading.Event()
        self.server = LocalServer(self.handle)

    def handle(self, request):
        if not self.arrived.is_set():
            self.arrived.set()
            self.server.released.wait(60)
        return json_answer(200, {"ok": True})


def test_a_step_whose_only_worker_is_killed_resumes_on_a_worker_of_its_version_only(
    flask_app, stack, tasks, tmp_path
):
    v1 = write_code(tmp_path, "v1", V1)
    v2 = write_code(tmp_path, "v2", V2)
    callee = HeldOnce()
    try:
        # Given a v1 step running on the only v1 worker, and a v2 worker beside it
        stack.start("beat")
        only_v1, other = start_workers(stack, v1, v2)
        task_id = tasks.submit("slow", {"url": callee.server.url + "/work"})
        assert callee.arrived.wait(30), stack.logs()

        # When the v1 worker is SIGKILLed mid-step
        stack.kill(only_v1)

        # Then the reaper gives the step a new attempt, which the v2 worker leaves alone
        wait_until(lambda: tasks.get(task_id)["attempt"] == 2, 30, what="reaped")
        time.sleep(3)
        waiting = tasks.get(task_id)
        assert (waiting["status"], waiting["lease_token"], waiting["agent_version"]) == (
            "working",
            None,
            "1",
        )
        assert steps_run(other, task_id) == []

        # When a v1 worker starts again
        start_worker(stack, v1)

        # Then the step resumes there, on version 1
        done = tasks.wait_status(task_id, "completed", 30)
    finally:
        callee.server.close()
    assert done["result"] == {"ran_on": "1", "attempt": 2}
    assert steps_run(other, task_id) == []
