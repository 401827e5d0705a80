"""Child tasks through the Python client and the CLI, against the real stack (web,
worker and beat subprocesses): a fanout's children, paged, and a refused child input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from app.cli import main
from outlast.client import Client, ValidationError


@pytest.fixture
def api(ops_stack):
    with Client(ops_stack.base_url, ops_stack.api_key, timeout=10) as client:
        yield client


def test_fanout_children_are_listed_by_the_client_and_the_cli_in_spawn_order(api, ops_stack):
    inputs = [{"message": f"n{i}", "step_seconds": 0.1 * (3 - i)} for i in range(3)]
    task = api.submit("fanout", {"agent": "echo", "inputs": inputs})
    done = api.wait(task["id"], timeout=60)
    assert done["status"] == "completed", done
    ids = done["result"]["children"]
    assert done["result"]["results"] == [{"message": f"n{i}", "steps": 1} for i in range(3)]

    listed = list(api.iter_children(task["id"], page_size=2))
    assert [t["id"] for t in listed] == ids
    assert {t["parent_id"] for t in listed} == {task["id"]}
    assert api.children(task["id"], limit=1)["next_cursor"] is not None

    env = {"OUTLAST_URL": ops_stack.base_url, "OUTLAST_API_KEY": ops_stack.api_key}
    ran = CliRunner().invoke(main, ["children", task["id"], "--json"], env=env)
    assert ran.exit_code == 0, ran.output
    assert [json.loads(line)["id"] for line in ran.stdout.splitlines()] == ids
    text = CliRunner().invoke(main, ["children", task["id"]], env=env)
    assert text.exit_code == 0 and all(i in text.stdout for i in ids)


def test_a_fanout_whose_child_input_is_refused_raises_validation_error(api):
    with pytest.raises(ValidationError) as refused:
        api.submit("fanout", {"agent": "echo", "inputs": [{"message": "ok"}, {"steps": 3}]})
    assert "input.inputs.1.message" in refused.value.errors
