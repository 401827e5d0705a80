"""Budgets (V2.md section 3) with a real worker: a call or step that would go past a
limit is not made; ``fail`` fails the task, ``ask`` waits for an extension or a stop."""

from __future__ import annotations

from typing import Any

import pytest

from app.engine.tools import call_key

ASK_SCHEMA = {
    "type": "object",
    "properties": {"extend": {"type": "object"}, "stop": {"type": "boolean"}},
}


def submit(client, auth, agent: str, input: dict[str, Any], budget: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/tasks", json={"agent": agent, "input": input, "budget": budget}, headers=auth
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def send_input(client, auth, task_id: str, answer: Any):
    return client.post(f"/v1/tasks/{task_id}/input", json={"input": answer}, headers=auth)


def test_max_tool_calls_fails_or_asks_and_extend_resumes_at_the_refused_call(
    celery_worker, client, auth, tasks, ledger
):
    # Given three `calls` tasks of 3 calls each, allowed 2 tool calls
    url = ledger.url
    failing = submit(client, auth, "calls", {"url": url + "/f", "calls": 3}, {"max_tool_calls": 2})
    extended = submit(
        client,
        auth,
        "calls",
        {"url": url + "/e", "calls": 3},
        {"max_tool_calls": 2, "on_exhausted": "ask"},
    )
    stopped = submit(
        client,
        auth,
        "calls",
        {"url": url + "/s", "calls": 3},
        {"max_tool_calls": 2, "on_exhausted": "ask"},
    )
    assert failing["budget"] == {"max_tool_calls": 2, "on_exhausted": "fail"}

    # "fail": the third call is not made and the task fails naming the limit
    failed = tasks.wait_status(failing["id"], "failed")
    assert failed["error"] == {
        "type": "budget_exceeded",
        "message": "budget exhausted: max_tool_calls = 2",
    }
    assert ledger.count("/f") == 2
    assert failed["usage"]["tool_calls"] == 2

    # "ask": the task waits, holding no worker, with the request of V2.md
    for task in (extended, stopped):
        waiting = tasks.wait_status(task["id"], "input_required")
        assert waiting["input_request"] == {
            "prompt": "budget exhausted: max_tool_calls = 2",
            "reason": "budget",
            "schema": ASK_SCHEMA,
        }
        assert waiting["lease_token"] is None
    assert ledger.count("/e") == 2 and ledger.count("/s") == 2

    # A bad extension is refused and changes nothing
    bad = send_input(client, auth, extended["id"], {"extend": {"max_tool_calls": 0, "x": 1}})
    assert bad.status_code == 422
    assert set(bad.get_json()["errors"]) == {"input.extend.max_tool_calls", "input.extend.x"}
    assert tasks.get(extended["id"])["status"] == "input_required"

    # extend: it resumes at the refused call; nothing done before is repeated
    resumed = send_input(client, auth, extended["id"], {"extend": {"max_tool_calls": 3}})
    assert resumed.status_code == 202, resumed.get_data(as_text=True)
    done = tasks.wait_status(extended["id"], "completed")
    assert done["result"] == {"calls": 3, "statuses": [200, 200, 200]}
    assert done["budget"] == {"max_tool_calls": 3, "on_exhausted": "ask"}
    assert done["usage"]["tool_calls"] == 3
    assert ledger.keys("/e") == {call_key(extended["id"], step, 0): 1 for step in range(3)}

    # stop: the task fails with budget_exceeded
    assert send_input(client, auth, stopped["id"], {"stop": True}).status_code == 202
    stop = tasks.wait_status(stopped["id"], "failed")
    assert stop["error"]["type"] == "budget_exceeded"
    assert "max_tool_calls = 2" in stop["error"]["message"]
    assert ledger.count("/s") == 2
    assert tasks.event_types(stopped["id"])[-1] == "task.failed"


def test_max_steps_stops_echo_before_the_step_that_would_pass_it(
    celery_worker, client, auth, tasks
):
    task = submit(client, auth, "echo", {"message": "hi", "steps": 5}, {"max_steps": 2})
    failed = tasks.wait_status(task["id"], "failed")
    assert failed["error"] == {
        "type": "budget_exceeded",
        "message": "budget exhausted: max_steps = 2",
    }
    assert failed["step"] == 2
    assert failed["progress"]["current"] == 2  # step 3 never started

    asked = submit(
        client,
        auth,
        "echo",
        {"message": "hi", "steps": 3},
        {"max_steps": 1, "on_exhausted": "ask"},
    )
    tasks.wait_status(asked["id"], "input_required")
    assert send_input(client, auth, asked["id"], {"extend": {"max_steps": 3}}).status_code == 202
    done = tasks.wait_status(asked["id"], "completed")
    assert done["result"] == {"message": "hi", "steps": 3}
    assert done["usage"] == {
        "model_calls": 0,
        "tool_calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
    }


def test_budget_is_checked_at_submission(client, auth):
    for budget, field in [
        ({"max_steps": 0}, "budget.max_steps"),
        ({"max_tool_calls": "3"}, "budget.max_tool_calls"),
        ({"max_model_calls": 1.5}, "budget.max_model_calls"),
        ({"on_exhausted": "later"}, "budget.on_exhausted"),
        ({"max_dollars": 3}, "budget.max_dollars"),
        ([1], "budget"),
    ]:
        response = client.post(
            "/v1/tasks",
            json={"agent": "echo", "input": {"message": "x"}, "budget": budget},
            headers=auth,
        )
        assert response.status_code == 422, budget
        assert field in response.get_json()["errors"], (budget, response.get_json())

    plain = submit(client, auth, "echo", {"message": "x"}, None)
    assert plain["budget"] is None
    assert submit(client, auth, "echo", {"message": "x"}, {})["budget"] == {"on_exhausted": "fail"}


@pytest.fixture
def budget_agents(settings):
    """tests.engine.budget_agents registered before the worker starts (a worker takes
    the steps of the agent versions its registry has when it starts)."""
    from app import settings as settings_mod
    from app.engine import registry

    settings_mod.configure(
        settings.replace(agents=(*settings.agents, "tests.engine.budget_agents"))
    )
    registry.load()


def test_a_refusal_stands_even_when_the_agent_catches_it(
    budget_agents, celery_worker, client, auth, tasks, ledger
):
    task = submit(
        client, auth, "test_swallows_refusals", {"url": ledger.url}, {"max_tool_calls": 1}
    )
    failed = tasks.wait_status(task["id"], "failed")
    assert failed["error"]["type"] == "budget_exceeded"
    assert ledger.count() == 1  # the refused calls were not made
