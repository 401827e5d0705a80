"""docs/agents.md's example agent, run as written by a real worker."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from app import settings as settings_mod
from app.engine import registry, sweeps
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def example_module_source() -> str:
    """The first Python block after "## An example" (it names its own module file)."""
    section = DOC.read_text().split("## An example", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert source.startswith("# greeter_agents.py\n")
    return source


@pytest.fixture
def greeter_agents(settings, tmp_path, monkeypatch):
    """The example saved as greeter_agents.py and named in OUTLAST_AGENTS, registered
    before the worker starts (a worker takes the steps of the versions it has then)."""
    (tmp_path / "greeter_agents.py").write_text(example_module_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    settings_mod.configure(settings.replace(agents=(*settings.agents, "greeter_agents")))
    registry.load()
    yield
    sys.modules.pop("greeter_agents", None)


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
