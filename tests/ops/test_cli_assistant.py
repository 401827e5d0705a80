"""docs/agents.md's "Run a tool-using model agent" offline example, run as written with
the real CLI against the real stack (web, worker, beat) and the offline model."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def offline_example() -> list[list[str]]:
    """The commands of the offline example's code blocks, split as a shell would."""
    section = DOC.read_text().split("### With no model configured", 1)[1].split("###", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_docs_offline_assistant_example_shows_each_turn_and_the_final_answer(ops_stack):
    from click.testing import CliRunner

    from app.cli import main

    runner = CliRunner()
    env = {"OUTLAST_URL": ops_stack.base_url, "OUTLAST_API_KEY": ops_stack.api_key}
    submit, answer, status = offline_example()
    assert submit[:3] == ["outlast", "submit", "assistant"]

    # The model asks its question: each turn shows, and the command exits 5 (input)
    asked = runner.invoke(main, submit[1:], env=env, catch_exceptions=False)
    assert asked.exit_code == 5, asked.stderr
    task_id = re.search(r"submitted (tsk_\S+)", asked.stderr).group(1)
    assert "turn 1: calls ask_human" in asked.stderr
    assert "turn 1: ask_human asks: Plan the v2 release" in asked.stderr
    assert f"{task_id} waits for input: Plan the v2 release" in asked.stderr

    # The answer resumes it; it completes with the answer quoted
    answered = runner.invoke(
        main, [answer[1], task_id, *answer[3:]], env=env, catch_exceptions=False
    )
    assert answered.exit_code == 0, answered.stderr
    done = runner.invoke(
        main, [status[1], task_id, *status[3:], "--json"], env=env, catch_exceptions=False
    )
    assert done.exit_code == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["result"]["turns"] == 2
    assert "Ship it on Friday" in task["result"]["content"]
    assert task["usage"]["model_calls"] == 2 and task["usage"]["tool_calls"] == 0
    assert task["usage"]["input_tokens"] > 0

    # --wait on a task that completes prints the turns, then the final answer on stdout
    final = runner.invoke(
        main,
        ["submit", "assistant", "--wait", "--input", '{"prompt": "Say hi"}'],
        env=env,
        catch_exceptions=False,
    )
    assert final.exit_code == 0, final.stderr
    assert "turn 1: answered" in final.stderr
    assert final.stdout.startswith("Offline model answer") and "Say hi" in final.stdout


def test_submit_budget_flag_limits_the_task(ops_stack):
    from click.testing import CliRunner

    from app.cli import main

    env = {"OUTLAST_URL": ops_stack.base_url, "OUTLAST_API_KEY": ops_stack.api_key}
    ran = CliRunner().invoke(
        main,
        [
            "submit",
            "echo",
            "--wait",
            "--input",
            '{"message": "m", "steps": 3}',
            "--budget",
            '{"max_steps": 1}',
        ],
        env=env,
        catch_exceptions=False,
    )
    assert ran.exit_code == 3, ran.stderr
    assert "budget_exceeded: budget exhausted: max_steps = 1" in ran.stderr
