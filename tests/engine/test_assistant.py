"""The ``assistant`` agent (V2.md section 9) with a real worker, a scripted model
endpoint and local tool services: the loop, tool errors, ask_human, max_turns,
usage, and what submission refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import settings as settings_mod
from app.engine.tools import call_key
from tests.engine.model_stub import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    ScriptedModel,
    asks,
    says,
    tool_call,
)
from tests.engine.servers import LocalServer, json_answer

BALANCE_PARAMETERS = {
    "type": "object",
    "properties": {"account": {"type": "string"}},
    "required": ["account"],
}


def submit(client, auth, input: dict[str, Any], **body: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/tasks", json={"agent": "assistant", "input": input, **body}, headers=auth
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def read(client, auth, task_id: str) -> dict[str, Any]:
    return client.get(f"/v1/tasks/{task_id}", headers=auth).get_json()


@pytest.fixture
def ledger_tools():
    """A balance service (``/balance``: 200 with JSON) and a service that answers 404."""

    def handle(request):
        if request.path.startswith("/balance"):
            return json_answer(200, {"account": request.json["account"], "balance": 42})
        return json_answer(404, {"detail": "no such account"})

    server = LocalServer(handle)
    yield server
    server.close()


def use_model(settings, model: ScriptedModel) -> None:
    settings_mod.configure(
        settings.replace(llm_base_url=model.base_url, llm_api_key="k", llm_model="stub-model")
    )


def test_model_drives_http_tools_over_two_turns_and_the_results_reach_it(
    celery_worker, client, auth, settings, tasks, ledger_tools
):
    # Given a model that asks for two HTTP tools (one answers 404), then answers
    model = ScriptedModel(
        [
            asks(
                tool_call("call_a", "balance", account="acme"),
                tool_call("call_b", "audit", account="acme"),
            ),
            says("The balance of acme is 42."),
        ]
    )
    use_model(settings, model)
    try:
        http_tools = [
            {
                "name": "balance",
                "description": "The balance of an account.",
                "url": ledger_tools.url + "/balance",
                "parameters": BALANCE_PARAMETERS,
            },
            {"name": "audit", "url": ledger_tools.url + "/audit", "parameters": BALANCE_PARAMETERS},
        ]
        task = submit(
            client,
            auth,
            {
                "prompt": "What is the balance of acme?",
                "system": "Be brief.",
                "http_tools": http_tools,
            },
        )
        assert task["usage"] == {
            "model_calls": 0,
            "tool_calls": 0,
            "input_tokens": 0,
            "output_tokens": 0,
        }
        tasks.wait_status(task["id"], "completed")
        done = read(client, auth, task["id"])
    finally:
        model.close()

    task_id = done["id"]
    first, second = model.server.requests
    # Each model call carries its own call key, the model, and the tools' schemas
    assert first.key == call_key(task_id, 0, 0) and second.key == call_key(task_id, 1, 0)
    assert first.json["model"] == "stub-model"
    assert [t["function"] for t in first.json["tools"]] == [
        {
            "name": "balance",
            "description": "The balance of an account.",
            "parameters": BALANCE_PARAMETERS,
        },
        {"name": "audit", "description": "", "parameters": BALANCE_PARAMETERS},
    ]
    # The tool results reach the model as tool messages with the right tool_call_id
    tool_messages = second.json["messages"][-2:]
    assert [(m["role"], m["tool_call_id"]) for m in tool_messages] == [
        ("tool", "call_a"),
        ("tool", "call_b"),
    ]
    assert json.loads(tool_messages[0]["content"]) == {"account": "acme", "balance": 42}
    # The 4xx answer reaches the model as exactly {"error": ...}, and the task goes on
    error = json.loads(tool_messages[1]["content"])
    assert list(error) == ["error"] and "404" in error["error"]
    # Each HTTP tool was POSTed its arguments once, with its call's key
    assert ledger_tools.keys("/balance") == {call_key(task_id, 0, 1): 1}
    assert ledger_tools.keys("/audit") == {call_key(task_id, 0, 2): 1}
    assert ledger_tools.requests[0].json == {"account": "acme"}

    result = done["result"]
    assert result["content"] == "The balance of acme is 42."
    assert result["turns"] == 2
    assert [m["role"] for m in result["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]
    assert result["messages"][0] == {"role": "system", "content": "Be brief."}
    assert result["messages"][1] == {"role": "user", "content": "What is the balance of acme?"}
    assert result["messages"][-1]["content"] == "The balance of acme is 42."
    assert result["messages"][3:5] == tool_messages
    assert done["usage"] == {
        "model_calls": 2,
        "tool_calls": 2,  # a 4xx answer counts: the call reached its tool
        "input_tokens": 2 * PROMPT_TOKENS,
        "output_tokens": 2 * COMPLETION_TOKENS,
    }
    # The progress events tell each turn and tool call as it happens
    progress = [
        r["data"]["task"]["progress"]["message"]
        for r in tasks.rows(
            "SELECT data FROM events WHERE task_id = :id AND type = 'task.progress' ORDER BY seq",
            id=task_id,
        )
    ]
    assert progress[0] == "turn 1: calls balance, audit"
    assert progress[1].startswith("turn 1: balance -> ")
    assert progress[-1] == "turn 2: answered"


def test_ask_human_waits_for_input_without_a_worker_and_the_answer_reaches_the_model(
    celery_worker, client, auth, settings, tasks
):
    model = ScriptedModel(
        [asks(tool_call("call_q", "ask_human", question="Which account?")), says("Done.")]
    )
    use_model(settings, model)
    try:
        task = submit(client, auth, {"prompt": "Close an account.", "ask_human": True})
        waiting = tasks.wait_status(task["id"], "input_required")
        assert waiting["input_request"] == {
            "prompt": "Which account?",
            "reason": "ask_human",
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
            },
        }
        assert waiting["lease_token"] is None  # no worker is held while it waits
        assert model.server.requests[0].json["tools"][-1]["function"]["name"] == "ask_human"

        answered = client.post(
            f"/v1/tasks/{task['id']}/input", json={"input": {"answer": "acme-2"}}, headers=auth
        )
        assert answered.status_code == 202, answered.get_data(as_text=True)
        tasks.wait_status(task["id"], "completed")
        done = read(client, auth, task["id"])
    finally:
        model.close()

    assert model.server.count() == 2
    last = model.server.requests[1].json["messages"][-1]
    assert last == {"role": "tool", "tool_call_id": "call_q", "content": "acme-2"}
    assert done["result"]["content"] == "Done." and done["result"]["turns"] == 2
    assert done["usage"]["tool_calls"] == 0  # ask_human is not a tool call
    assert done["usage"]["model_calls"] == 2


def test_model_limits_fail_the_task_before_the_call_that_would_pass_them(
    celery_worker, client, auth, settings, tasks, ledger_tools
):
    # Given a model that asks for a tool on every turn, never answering
    model = ScriptedModel([lambda request: asks(tool_call("c", "balance", account="x"))])
    use_model(settings, model)
    http_tools = [
        {"name": "balance", "url": ledger_tools.url + "/balance", "parameters": BALANCE_PARAMETERS}
    ]
    cases = {
        # name: (input extras, budget, limit named, model calls made)
        "max_turns": ({"max_turns": 2}, None, "max_turns", 2),
        "max_model_calls": ({}, {"max_model_calls": 3}, "max_model_calls = 3", 3),
        # 15 tokens a call: calls 1 and 2 start below 20, the third does not start
        "max_total_tokens": ({}, {"max_total_tokens": 20}, "max_total_tokens = 20", 2),
    }
    try:
        submitted = {}
        for name, (extra, budget, _, _) in cases.items():
            body = {"budget": budget} if budget else {}
            submitted[name] = submit(
                client,
                auth,
                {"prompt": f"{name}: go on", "http_tools": http_tools, **extra},
                **body,
            )["id"]
        finished = {name: tasks.wait_status(tid, "failed") for name, tid in submitted.items()}
        counts = {name: len(model.requests_for(f"{name}:")) for name in cases}
    finally:
        model.close()

    for name, (_, _, named, calls) in cases.items():
        error = finished[name]["error"]
        assert error["type"] == "budget_exceeded", (name, error)
        assert named in error["message"], (name, error)
        assert counts[name] == calls, name
        assert finished[name]["usage"]["model_calls"] == calls, name
        # The tool calls asked for in the last allowed turn were made
        assert finished[name]["usage"]["tool_calls"] == calls, name
    assert finished["max_total_tokens"]["usage"]["input_tokens"] == 2 * PROMPT_TOKENS


def test_the_offline_model_calls_each_tool_once_then_summarises(
    celery_worker, client, auth, tasks, ledger_tools
):
    # No OUTLAST_LLM_BASE_URL: the offline model answers
    task = submit(
        client,
        auth,
        {
            "prompt": "acme",
            "http_tools": [
                {
                    "name": "balance",
                    "url": ledger_tools.url + "/balance",
                    "parameters": BALANCE_PARAMETERS,
                }
            ],
        },
    )
    tasks.wait_status(task["id"], "completed")
    done = read(client, auth, task["id"])
    assert done["result"]["turns"] == 2
    assert ledger_tools.requests[0].json == {"account": "acme"}
    assert "balance" in done["result"]["content"]
    assert done["usage"]["model_calls"] == 2 and done["usage"]["tool_calls"] == 1
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0


def test_bad_assistant_input_is_refused_with_the_field_named(client, auth, settings):
    settings_mod.configure(settings.replace(webhook_allow_private=False))
    private_tool = {"name": "t", "url": "http://127.0.0.1:9/x", "parameters": {"type": "object"}}
    cases = [
        ({"system": "hi"}, "input.prompt"),
        ({"prompt": "hi", "max_turns": 0}, "input.max_turns"),
        ({"prompt": "hi", "max_turns": 201}, "input.max_turns"),
        ({"prompt": "hi", "tools": ["no_such_tool"]}, "input.tools.0"),
        ({"prompt": "hi", "tools": ["llm"]}, "input.tools.0"),
        ({"prompt": "hi", "http_tools": [private_tool]}, "input.http_tools.0.url"),
        (
            {"prompt": "hi", "http_tools": [{**private_tool, "url": "http://[::ffff:10.0.0.1]/"}]},
            "input.http_tools.0.url",
        ),
        (
            {"prompt": "hi", "http_tools": [{"name": "bad name!", "url": "https://example.com"}]},
            "input.http_tools.0.name",
        ),
        (
            {
                "prompt": "hi",
                "ask_human": True,
                "http_tools": [{"name": "ask_human", "url": "https://example.com"}],
            },
            "input.http_tools.0.name",
        ),
        (
            {
                "prompt": "hi",
                "http_tools": [
                    {"name": "t", "url": "https://example.com", "parameters": {"type": "nope"}}
                ],
            },
            "input.http_tools.0.parameters",
        ),
        ({"prompt": "hi", "surprise": 1}, "input.surprise"),
    ]
    for input, field in cases:
        response = client.post(
            "/v1/tasks", json={"agent": "assistant", "input": input}, headers=auth
        )
        assert response.status_code == 422, (input, response.get_data(as_text=True))
        body = response.get_json(force=True)
        assert body["code"] == "validation_error"
        assert field in body["errors"], (input, body["errors"])
        assert "127.0.0.1" not in json.dumps(body) and "10.0.0.1" not in json.dumps(body)

    # messages alone are enough, and so is a registered tool
    ok = client.post(
        "/v1/tasks",
        json={
            "agent": "assistant",
            "input": {"messages": [{"role": "user", "content": "hi"}], "tools": ["http_get"]},
        },
        headers=auth,
    )
    assert ok.status_code == 202, ok.get_data(as_text=True)


def test_a_conversation_past_the_checkpoint_limit_fails_the_task_with_a_clear_error(
    celery_worker, client, auth, settings, tasks
):
    # Given a checkpoint limit of 4 KiB and a tool whose answer is bigger than that
    settings_mod.configure(settings.replace(max_checkpoint_bytes=4096))
    big = LocalServer(lambda request: json_answer(200, {"text": "x" * 6000}))
    try:
        task = submit(
            client,
            auth,
            {"prompt": "fetch", "http_tools": [{"name": "fetch", "url": big.url + "/big"}]},
        )
        failed = tasks.wait_status(task["id"], "failed")
    finally:
        big.close()

    # Then the task fails, saying why, and nothing else broke: the log kept the call
    assert failed["error"]["type"] == "invalid_output"
    assert "OUTLAST_MAX_CHECKPOINT_BYTES (4096)" in failed["error"]["message"]
    assert failed["step"] == 0
    assert failed["usage"]["tool_calls"] == 1
    assert tasks.event_types(task["id"])[-1] == "task.failed"
