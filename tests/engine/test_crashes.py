"""Faults with real processes: workers SIGKILLed mid-step, restarts during a durable
timer, and waiting for input without holding a worker slot."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from app.engine.tools import call_key
from app.store import db, lifecycle, outbox
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def start_worker(stack, **env: str):
    worker = stack.start("worker", extra_env={"OUTLAST_WORKER_CONCURRENCY": "1", **env})
    stack.wait_worker_ready(worker)
    return worker


class HeldOnce:
    """A callee whose first request to ``held_path`` hangs until the test ends (the
    worker making it gets killed meanwhile); every other request answers at once."""

    def __init__(self, held_path: str, answer: dict):
        self.held_path = held_path
        self.answer = answer
        self.arrived = threading.Event()
        self.server = LocalServer(self.handle)

    def handle(self, request):
        if request.path.startswith(self.held_path) and not self.arrived.is_set():
            self.arrived.set()
            self.server.released.wait(60)
        return json_answer(200, self.answer)


class ModelStub:
    """An OpenAI-compatible ``/chat/completions``: asks for the ``lookup`` tool, then
    answers with what the tool returned."""

    def __init__(self):
        self.server = LocalServer(self.handle)

    def handle(self, request):
        body = request.json
        last = body["messages"][-1]
        if last["role"] == "tool":
            message = {"role": "assistant", "content": f"It means {last['content']}"}
            finish = "stop"
        else:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"word": "outlast"}'},
                    }
                ],
            }
            finish = "tool_calls"
        return json_answer(
            200,
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            },
        )


def test_killed_worker_and_beat_lose_no_work_and_repeat_no_completed_call(flask_app, stack, tasks):
    """One crash, three victims (they share the expensive process restarts):

    - a step killed between its tool calls and its checkpoint resumes with the completed
      call replayed from the log and the interrupted one repeated with the same key;
    - a model loop killed after the model answered does not call the model again;
    - a sleepy task whose wake-up falls while worker and beat are down still wakes.
    """
    callee = HeldOnce("/slow", {"ok": True})
    lookup = HeldOnce("/lookup", {"definition": "to last longer than"})
    model = ModelStub()
    llm_env = {
        "OUTLAST_LLM_BASE_URL": model.server.url + "/v1",
        "OUTLAST_LLM_API_KEY": "test-key",
        "OUTLAST_LLM_MODEL": "stub-model",
        "OUTLAST_WORKER_CONCURRENCY": "3",
    }
    try:
        # Given: two steps held inside a tool call, and a task sleeping on a timer
        beat = stack.start("beat")
        worker = start_worker(stack, **llm_env)
        two_calls = tasks.submit("test_two_calls", {"url": callee.server.url})
        model_loop = tasks.submit(
            "test_llm_tools", {"url": lookup.server.url, "question": "What is outlast?"}
        )
        sleepy = tasks.submit("sleepy", {"seconds": 4})
        assert callee.arrived.wait(30), stack.logs()
        assert lookup.arrived.wait(30), stack.logs()
        assert model.server.count() == 1
        sleeping = wait_until(
            lambda: (row := tasks.get(sleepy))["wake_at"] is not None and row,
            30,
            what="sleepy asleep",
        )
        assert sleeping["lease_token"] is None  # no worker holds a sleeping task

        # When: every worker and the beat die, and stay dead past the wake-up time
        stack.kill(worker)
        stack.kill(beat)
        time.sleep(max(0.0, (sleeping["wake_at"] - datetime.now(UTC)).total_seconds()) + 0.5)
        stack.start("beat")
        start_worker(stack, **llm_env)

        done = [tasks.wait_status(t, "completed", 40) for t in (two_calls, model_loop, sleepy)]
    finally:
        callee.server.close()
        lookup.server.close()
        model.server.close()

    # Then the interrupted step resumed once (attempt 2): call 0 replayed, call 1 repeated
    calls_task, loop_task, sleepy_task = done
    assert calls_task["result"] == {"statuses": [200, 200], "attempt": 2}
    assert callee.server.keys("/fast") == {call_key(two_calls, 0, 0): 1}
    assert callee.server.keys("/slow") == {call_key(two_calls, 0, 1): 2}
    logged = tasks.rows(
        "SELECT call_index, status, attempts FROM tool_calls WHERE task_id = :id "
        "ORDER BY call_index",
        id=two_calls,
    )
    assert [(r["call_index"], r["status"], r["attempts"]) for r in logged] == [
        (0, "completed", 1),
        (1, "completed", 2),
    ]
    assert "task.retrying" in tasks.event_types(two_calls)

    # The model was paid twice in all (ask, then answer), not three times
    assert "to last longer than" in loop_task["result"]["answer"]
    assert loop_task["result"]["attempt"] == 2
    assert model.server.count() == 2
    first, second = model.server.requests
    assert first.path == second.path == "/v1/chat/completions"
    assert first.headers["authorization"] == "Bearer test-key"
    assert first.json["model"] == "stub-model"
    assert first.json["tools"][0]["function"]["name"] == "lookup"
    assert [m["role"] for m in second.json["messages"]] == ["user", "assistant", "tool"]
    assert lookup.server.keys("/lookup") == {call_key(model_loop, 0, 1): 2}

    # The timer that fell due while everything was down fired once the beat was back
    assert sleepy_task["result"] == {"slept": 4}
    assert sleepy_task["finished_at"] >= sleeping["wake_at"]
    assert sleepy_task["attempt"] == 1  # it held no lease, so nothing was reaped


def test_approval_waits_without_holding_a_worker_and_completes_after_input(
    flask_app, stack, tasks, tenant
):
    start_worker(stack)  # one slot only
    task_id = tasks.submit("approval", {"question": "Ship it?"})

    waiting = tasks.wait_status(task_id, "input_required", timeout=30)
    assert waiting["input_request"] == {
        "prompt": "Ship it?",
        "schema": {
            "type": "object",
            "properties": {"approved": {"type": "boolean"}, "comment": {"type": "string"}},
            "required": ["approved"],
        },
    }
    assert waiting["lease_token"] is None

    # The only worker slot is free: another task runs to completion meanwhile
    other = tasks.submit("echo", {"message": "meanwhile", "steps": 2})
    tasks.wait_status(other, "completed", timeout=30)
    assert tasks.get(task_id)["status"] == "input_required"

    with db.transaction() as conn:
        resumed = lifecycle.resume_with_input(
            conn, task_id, tenant.tenant_id, {"approved": True, "comment": "go"}
        )
        outbox.add_step(conn, task_id, resumed["step"])

    task = tasks.wait_status(task_id, "completed", timeout=30)
    assert task["result"] == {"approved": True, "comment": "go"}
    assert task["human_input"] is None  # consumed by the step's checkpoint
    types = tasks.event_types(task_id)
    assert types.index("task.input_required") < types.index("task.resumed")
