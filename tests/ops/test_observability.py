"""The operator's view of a running stack: Flower, /metrics and the JSON logs of the
Procfile's web, worker, beat and flower processes (real subprocesses)."""

from __future__ import annotations

import json

import pytest
import requests

from tests.harness import wait_until
from tests.ops.conftest import sample

FLOWER_USERS = "ops:s3cret,viewer:also-s3cret"


@pytest.fixture(scope="module")
def flower(ops_stack):
    """Flower from the Procfile's line, started before any task of this module runs so
    that it sees their events from the start."""
    proc = ops_stack.stack.start("flower", {"OUTLAST_FLOWER_BASIC_AUTH": FLOWER_USERS})
    url = f"http://127.0.0.1:{proc.port}"

    def up() -> bool:
        try:
            return requests.get(url + "/api/workers", auth=("ops", "s3cret"), timeout=5).ok
        except requests.RequestException:
            return False

    wait_until(up, 60, interval=0.3, what="flower answering /api/workers")
    return url


@pytest.fixture(scope="module")
def finished_echo(ops_stack, flower):
    """One two-step echo task run to completion through the web and worker processes."""
    headers = {"Authorization": f"Bearer {ops_stack.api_key}"}
    before = requests.get(ops_stack.base_url + "/metrics", timeout=10).text
    answer = requests.post(
        ops_stack.base_url + "/v1/tasks",
        json={"agent": "echo", "input": {"message": "watched", "steps": 2}},
        headers=headers,
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["id"]

    def completed() -> dict | None:
        task = requests.get(
            f"{ops_stack.base_url}/v1/tasks/{task_id}", params={"wait": 5}, headers=headers
        ).json()
        return task if task["status"] == "completed" else None

    task = wait_until(completed, 60, what=f"{task_id} completed")
    return {"task": task, "metrics_before": before}


def test_flower_shows_each_finished_step_by_agent_and_step(flower, finished_echo):
    task_id = finished_echo["task"]["id"]

    def steps_in_flower() -> list[dict] | None:
        tasks = requests.get(flower + "/api/tasks", auth=("ops", "s3cret"), timeout=5).json()
        mine = [t for t in tasks.values() if task_id in (t.get("args") or "")]
        done = [t for t in mine if t.get("state") == "SUCCESS"]
        return done if len(done) == 2 else None

    steps = wait_until(steps_in_flower, 30, interval=0.3, what="both steps in Flower")

    assert {t["name"] for t in steps} == {"outlast.run_step[echo@1]"}  # agent and version
    assert sorted(t["args"] for t in steps) == [f"task {task_id} step 0", f"task {task_id} step 1"]
    assert all(t["worker"] and t["runtime"] is not None for t in steps)
    assert sorted(t["result"] for t in steps) == ["'completed'", "'continued'"]


def test_flower_requires_one_of_its_basic_auth_users(flower):
    assert requests.get(flower + "/api/tasks", timeout=5).status_code == 401
    assert requests.get(flower + "/api/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401
    assert requests.get(flower + "/api/tasks", auth=("viewer", "also-s3cret"), timeout=5).ok


def test_worker_metrics_reach_the_web_scrape(ops_stack, finished_echo):
    before = finished_echo["metrics_before"]
    steps = "outlast_step_duration_seconds_count"

    def delta(name: str, **labels: str) -> float:
        return (sample(after, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    # A step's duration is recorded once its checkpoint commits, after the task reads
    # completed, and a process sends its recordings within 50 ms (metrics.FLUSH_SECONDS):
    # the last step shows up in a scrape shortly after the task is done, not at once.
    def scraped_with_last_step() -> str | None:
        nonlocal after
        after = requests.get(ops_stack.base_url + "/metrics", timeout=10).text
        return after if delta(steps, agent="echo", outcome="completed") else None

    after = ""
    wait_until(scraped_with_last_step, 2, interval=0.02, what="the last step in /metrics")

    # Recorded by the worker subprocess (steps, completion) and the web one (submission).
    assert delta(steps, agent="echo", outcome="continued") == 1
    assert delta(steps, agent="echo", outcome="completed") == 1
    assert delta("outlast_tasks_submitted_total", agent="echo") == 1
    assert delta("outlast_tasks_finished_total", agent="echo", status="completed") == 1
    assert sample(after, "outlast_queue_depth", queue="steps") is not None


def test_web_lines_carry_a_request_id_that_is_also_answered(ops_stack):
    given = requests.get(
        ops_stack.base_url + "/healthz", headers={"X-Request-Id": "ops-check-42"}, timeout=5
    )
    fresh = requests.get(ops_stack.base_url + "/v1/tasks/tsk_nope", timeout=5)

    assert given.headers["X-Request-Id"] == "ops-check-42"
    assert fresh.status_code == 401 and fresh.headers["X-Request-Id"].startswith("req_")

    def access_lines() -> list[dict]:
        lines = _json_lines(ops_stack.stack, "web")
        found = [
            x
            for x in lines
            if x.get("request_id") in ("ops-check-42", fresh.headers["X-Request-Id"])
        ]
        return found if len(found) == 2 else []

    given_line, fresh_line = sorted(wait_until(access_lines, 10), key=lambda x: x["path"])
    assert (given_line["path"], given_line["status"]) == ("/healthz", 200)
    assert (fresh_line["path"], fresh_line["status"]) == ("/v1/tasks/tsk_nope", 401)
    assert given_line["logger"] == "gunicorn.access" and given_line["duration_ms"] >= 0


def test_worker_lines_name_the_task_step_agent_and_attempt(ops_stack, finished_echo):
    task_id = finished_echo["task"]["id"]

    lines = [x for x in _json_lines(ops_stack.stack, "worker") if x.get("task_id") == task_id]

    steps_logged = {x["step"] for x in lines}
    assert steps_logged == {0, 1}
    assert all(
        x["agent"] == "echo" and x["agent_version"] == "1" and x["attempt"] == 1
        for x in lines
        if "succeeded" in x["message"]
    )
    assert len([x for x in lines if "succeeded" in x["message"]]) == 2


def test_every_process_logs_one_json_object_per_line(ops_stack, flower, finished_echo):
    for name in ("web", "worker", "beat", "flower"):
        lines = _json_lines(ops_stack.stack, name)
        assert lines, f"{name} logged nothing"
        assert all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    beat = _json_lines(ops_stack.stack, "beat")
    # Its per-sweep lines are DEBUG (an idle stack is quiet: tests/ops/test_up.py).
    assert any("beat: Starting" in x["message"] for x in beat)
    assert {x["process"] for x in _json_lines(ops_stack.stack, "worker")} == {"worker"}


def _json_lines(stack, name: str) -> list[dict]:
    """Every line the process ``name`` logged, each parsed as one JSON object."""
    (proc,) = [p for p in stack.processes if p.name.startswith(name + ".")]
    parsed = []
    for line in proc.log_text().splitlines():
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{name} wrote a line that is not JSON: {line!r}")
    return parsed
