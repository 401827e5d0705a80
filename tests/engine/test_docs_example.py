"""docs/agents.md's example agent, run as written by a real worker."""

from __future__ import annotations

import pytest

from app.engine import sweeps
from tests.engine.doc_examples import register_example
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until


@pytest.fixture
def greeter_agents(settings, tmp_path, monkeypatch):
    yield from register_example(settings, tmp_path, monkeypatch, "An example", "greeter_agents")


def test_docs_example_agent_greets_everyone_once_despite_a_failing_service(
    greeter_agents, celery_worker, tasks
):
    # Given the example saved as greeter_agents.py and named in OUTLAST_AGENTS

    # And a greeting service that fails once, then remembers greetings by key
    greetings: dict[str, str] = {}
    failures = iter([503])

    def greeting_service(request):
        status = next(failures, None) if request.json["name"] == "Alan" else None
        if status:
            return json_answer(status, {})
        greeting_id = greetings.setdefault(request.key, f"greeting-{len(greetings) + 1}")
        return json_answer(200, {"id": greeting_id})

    service = LocalServer(greeting_service)
    try:
        task_id = tasks.submit("greeter", {"url": service.url, "names": ["Ada", "Alan", "Grace"]})

        def completed() -> bool:
            sweeps.wake_due_timers()  # the beat's timer sweep wakes the retried step
            return tasks.get(task_id)["status"] == "completed"

        wait_until(completed, 30, interval=0.2, what="greeter completed")
    finally:
        service.close()

    task = tasks.get(task_id)
    assert task["result"] == {"greetings": ["greeting-1", "greeting-2", "greeting-3"]}
    assert task["progress"] == {"current": 3, "total": 3, "message": "greeted Grace"}
    assert task["step"] == 3
    assert tasks.event_types(task_id).count("task.retrying") == 1
    # Alan's call was made twice (503, then the retry) with one key; nobody else's was
    assert sorted(service.keys().values()) == [1, 1, 2]
