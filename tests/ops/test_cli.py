"""The callers' CLI (``outlast submit/status/events/cancel/input``) as a real command
against the real stack (web, worker and beat subprocesses)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

OUTLAST = str(Path(sys.executable).with_name("outlast"))


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def outlast(ops_stack):
    """Run ``outlast ARGS`` in this process (click's runner: no interpreter start-up per
    call) with the stack's URL and key in the environment, over real HTTP."""
    from click.testing import CliRunner

    from app.cli import main

    runner = CliRunner()
    env = {"OUTLAST_URL": ops_stack.base_url, "OUTLAST_API_KEY": ops_stack.api_key}

    def run(*args: str) -> Ran:
        result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run


def test_submit_prints_the_task_id_and_status_shows_the_task(outlast):
    submitted = outlast("submit", "echo", "--input", '{"message": "hi"}')
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert re.fullmatch(r"tsk_\S+", task_id)

    shown = outlast("status", task_id, "--wait", "20", "--json")

    assert shown.returncode == 0, shown.stderr
    task = json.loads(shown.stdout)
    assert (task["id"], task["status"], task["result"]) == (
        task_id,
        "completed",
        {"message": "hi", "steps": 1},
    )
    human = outlast("status", task_id)
    assert f"{task_id}  echo  completed  step 1" in human.stdout


def test_submit_wait_json_prints_the_finished_task(outlast):
    done = outlast("submit", "echo", "--input", '{"message": "w", "steps": 2}', "--wait", "--json")

    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "completed" and task["result"] == {"message": "w", "steps": 2}


def test_submit_wait_exit_code_says_the_task_failed(outlast):
    failed = outlast(
        "submit", "echo", "--input", '{"message": "x", "steps": 2, "fail_at_step": 1}', "--wait"
    )

    assert failed.returncode == 3
    assert "failed: agent_error" in failed.stderr


def test_input_resumes_a_waiting_task(outlast, tmp_path):
    question = tmp_path / "question.json"
    question.write_text('{"question": "deploy?"}')
    task_id = outlast("submit", "approval", "--input", f"@{question}").stdout.strip()

    waiting = outlast("status", task_id, "--wait", "20")
    assert waiting.returncode == 5  # input_required
    assert "deploy?" in waiting.stdout
    answered = outlast("input", task_id, '{"approved": true, "comment": "yes"}', "--json")
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["status"] in ("pending", "working", "completed")
    done = outlast("status", task_id, "--wait", "20", "--json")

    assert done.returncode == 0
    assert json.loads(done.stdout)["result"] == {"approved": True, "comment": "yes"}


def test_events_follow_streams_until_the_terminal_event(outlast):
    task_id = outlast(
        "submit", "echo", "--input", '{"message": "e", "steps": 3, "step_seconds": 0.2}'
    ).stdout.strip()

    followed = outlast("events", task_id, "--follow", "--json")

    assert followed.returncode == 0, followed.stderr
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "task.completed"
    listed = outlast("events", task_id, "--after", "1")
    assert listed.stdout.splitlines()[0].split()[0] == "2"
    assert "task.completed" in listed.stdout.splitlines()[-1]


def test_cancel_stops_a_running_task(outlast, ops_stack):
    task_id = outlast("submit", "echo", "--input", '{"message": "long", "step_seconds": 60}')
    task_id = task_id.stdout.strip()

    cancelled = outlast("cancel", task_id, "--url", ops_stack.base_url)

    assert cancelled.returncode == 0, cancelled.stderr
    assert f"{task_id}  echo  cancelled" in cancelled.stdout
    assert outlast("status", task_id, "--wait", "5").returncode == 4


def test_refusals_exit_1_with_the_problem_code_and_bad_json_is_a_usage_error(outlast):
    missing = outlast("status", "tsk_does_not_exist")
    assert missing.returncode == 1
    assert "404 not_found" in missing.stderr
    invalid = outlast("submit", "echo", "--input", '{"steps": 2}')
    assert invalid.returncode == 1
    assert "validation_error" in invalid.stderr and "input.message" in invalid.stderr
    not_json = outlast("submit", "echo", "--input", "{nope")
    assert not_json.returncode == 2
    assert "--input is not valid JSON" in not_json.stderr


def test_console_script_takes_key_and_url_as_flags(ops_stack):
    listed = subprocess.run(
        [OUTLAST, "status", "tsk_x", "--url", ops_stack.base_url, "--api-key", "olk_wrong"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": str(Path(sys.executable).parent)},
    )

    assert listed.returncode == 1
    assert "401 unauthorized" in listed.stderr


def test_submit_wait_shows_a_progress_bar_advancing_in_a_terminal(ops_stack):
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux); it plays the terminal here")
    server = f"outlast-test-{uuid.uuid4().hex[:8]}"  # a private tmux server, killed below
    command = " ".join(
        [
            "env",
            f"OUTLAST_URL={shlex.quote(ops_stack.base_url)}",
            f"OUTLAST_API_KEY={shlex.quote(ops_stack.api_key)}",
            shlex.quote(OUTLAST),
            "submit echo --input",
            shlex.quote('{"message":"hi","steps":5,"step_seconds":0.5}'),
            "--wait; echo EXIT=$?; sleep 60",
        ]
    )
    subprocess.run(
        [tmux, "-L", server, "new-session", "-d", "-x", "150", "-y", "20", command],
        check=True,
        timeout=10,
    )
    frames: list[str] = []
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            pane = subprocess.run(
                [tmux, "-L", server, "capture-pane", "-p"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            frames.append(pane)
            if "EXIT=" in pane:
                break
            time.sleep(0.1)
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True, timeout=10)

    positions: list[int] = []
    for pane in frames:
        found = re.findall(r"\[[#-]+\]\s+(\d)/5", pane)
        if found and (not positions or int(found[-1]) != positions[-1]):
            positions.append(int(found[-1]))
    final = frames[-1]
    assert "EXIT=0" in final, final
    assert positions == sorted(positions) and positions[-1] == 5, positions
    assert len(positions) >= 3, f"the bar did not advance step by step: {positions}"
    assert '"message": "hi"' in final


def test_submit_wait_answers_a_quick_task_from_the_submission_itself(outlast, ops_stack):
    started = time.monotonic()
    done = outlast("submit", "echo", "--input", '{"message": "quick"}', "--wait", "--json")

    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "completed" and time.monotonic() - started < 5
    assert f"submitted {task['id']} (echo)" in done.stderr  # the id, to acknowledge it
    # Answered by Prefer: wait: the task was never followed through its event stream.
    (web,) = [p for p in ops_stack.stack.processes if p.name.startswith("web")]
    assert f"/v1/tasks/{task['id']}/events" not in web.log_text()
    assert "POST /v1/tasks" in web.log_text()  # (the access log is there to read)


def test_results_lists_unacknowledged_results_until_ack_and_delete_removes_one(outlast):
    first = json.loads(
        outlast("submit", "echo", "--input", '{"message": "r1"}', "--wait", "--json").stdout
    )
    second = json.loads(
        outlast("submit", "echo", "--input", '{"message": "r2"}', "--wait", "--json").stdout
    )

    listed = outlast("results", "--agent", "echo")
    assert listed.returncode == 0, listed.stderr
    assert first["id"] in listed.stdout and second["id"] in listed.stdout
    acked = outlast("ack", first["id"])
    assert acked.returncode == 0, acked.stderr
    assert f"{first['id']}  echo  completed" in acked.stdout and "acknowledged 20" in acked.stdout
    after = outlast("results", "--json")
    assert [json.loads(line)["id"] for line in after.stdout.splitlines()].count(first["id"]) == 0
    assert second["id"] in after.stdout

    deleted = outlast("delete", second["id"])
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"deleted {second['id']}"
    assert outlast("status", second["id"]).returncode == 1
    assert second["id"] not in outlast("results").stdout


def test_results_ack_acknowledges_what_it_lists(outlast):
    task = json.loads(
        outlast("submit", "echo", "--input", '{"message": "r3"}', "--wait", "--json").stdout
    )

    listed = outlast("results", "--ack", "--json")

    assert listed.returncode == 0, listed.stderr
    shown = {json.loads(line)["id"]: json.loads(line) for line in listed.stdout.splitlines()}
    assert shown[task["id"]]["acknowledged_at"] is not None
    assert outlast("results").stdout.strip() == ""


def test_ack_and_delete_of_a_running_task_exit_1_task_not_terminal(outlast):
    task_id = outlast("submit", "echo", "--input", '{"message": "busy", "step_seconds": 30}')
    task_id = task_id.stdout.strip()
    try:
        for command in ("ack", "delete"):
            refused = outlast(command, task_id)
            assert refused.returncode == 1
            assert "409 task_not_terminal" in refused.stderr
    finally:
        outlast("cancel", task_id)
