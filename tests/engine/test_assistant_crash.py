"""The assistant survives a SIGKILLed worker (V2.md section 9): completed model and tool
calls are replayed from the log, the interrupted call is repeated with the same key,
nothing else is repeated, and usage counts each completed call once."""

from __future__ import annotations

import threading

import pytest

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

pytestmark = [pytest.mark.faults, pytest.mark.slow]

PARAMETERS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


class HeldModel(ScriptedModel):
    """The scripted model, except that the first request of a conversation starting
    with ``held_prefix`` hangs until the test ends (its worker is killed meanwhile)."""

    def __init__(self, script, held_prefix: str):
        super().__init__(script)
        self.held_prefix = held_prefix
        self.arrived = threading.Event()

    def handle(self, request):
        users = [m for m in request.json["messages"] if m.get("role") == "user"]
        if users[0]["content"].startswith(self.held_prefix) and not self.arrived.is_set():
            self.arrived.set()
            self.server.released.wait(60)
        return super().handle(request)


def test_killed_worker_repeats_only_the_interrupted_call_with_its_key(flask_app, stack, tasks):
    slow_arrived = threading.Event()

    def tool_service(request):
        if request.path.startswith("/slow") and not slow_arrived.is_set():
            slow_arrived.set()
            service.released.wait(60)  # held open until the worker is dead
        return json_answer(200, {"path": request.path})

    service = LocalServer(tool_service)
    model = HeldModel(
        [asks(tool_call("c1", "fast", n=1), tool_call("c2", "slow", n=2)), says("done")],
        held_prefix="B:",
    )
    env = {
        "OUTLAST_LLM_BASE_URL": model.base_url,
        "OUTLAST_LLM_MODEL": "stub-model",
        "OUTLAST_WORKER_CONCURRENCY": "2",
    }
    http_tools = [
        {"name": name, "url": f"{service.url}/{name}", "parameters": PARAMETERS}
        for name in ("fast", "slow")
    ]
    try:
        # Given a task held inside its second tool call (A), and one held inside its
        # first model call (B)
        stack.start("beat")
        worker = stack.start("worker", extra_env=env)
        stack.wait_worker_ready(worker)
        held_tool = tasks.submit(
            "assistant",
            {"prompt": "A: go", "http_tools": http_tools, "ask_human": False, "max_turns": 20},
        )
        held_model = tasks.submit(
            "assistant",
            {"prompt": "B: go", "http_tools": http_tools[:1], "ask_human": False, "max_turns": 20},
        )
        assert slow_arrived.wait(30), stack.logs()
        assert model.arrived.wait(30), stack.logs()

        # When the worker is SIGKILLed and another one starts
        stack.kill(worker)
        stack.wait_worker_ready(stack.start("worker", extra_env=env))
        done = {t: tasks.wait_status(t, "completed", 60) for t in (held_tool, held_model)}
        a_requests = model.requests_for("A:")
        b_requests = model.requests_for("B:")
    finally:
        service.close()
        model.close()

    # A: each model turn was asked once; the completed `fast` call was replayed, the
    # interrupted `slow` call repeated with the same key
    a = done[held_tool]
    assert a["attempt"] == 2
    assert [r.key for r in a_requests] == [call_key(held_tool, 0, 0), call_key(held_tool, 1, 0)]
    assert service.keys("/fast") == {call_key(held_tool, 0, 1): 1, call_key(held_model, 0, 1): 1}
    assert service.keys("/slow") == {call_key(held_tool, 0, 2): 2}
    assert a["result"]["content"] == "done" and a["result"]["turns"] == 2
    assert a["usage"] == {
        "model_calls": 2,
        "tool_calls": 2,
        "input_tokens": 2 * PROMPT_TOKENS,
        "output_tokens": 2 * COMPLETION_TOKENS,
    }

    # B: the interrupted model call was repeated with the same Idempotency-Key, once;
    # the next turn was asked once
    b = done[held_model]
    assert [r.key for r in b_requests] == [
        call_key(held_model, 0, 0),
        call_key(held_model, 0, 0),
        call_key(held_model, 1, 0),
    ]
    assert b["usage"]["model_calls"] == 2  # the interrupted call completed once
    assert b["usage"]["tool_calls"] == 1
    logged = tasks.rows(
        "SELECT name, status, attempts FROM tool_calls WHERE task_id = :id "
        "ORDER BY step_index, call_index",
        id=held_tool,
    )
    assert [(r["name"], r["status"], r["attempts"]) for r in logged] == [
        ("llm", "completed", 1),
        ("fast", "completed", 1),
        ("slow", "completed", 2),
        ("llm", "completed", 1),
    ]
