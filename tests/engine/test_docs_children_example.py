"""docs/agents.md's child-task example, run as written by a real worker."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from app import settings as settings_mod
from app.engine import registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def example_module_source() -> str:
    """The first Python block after "## Child tasks" (it names its own module file)."""
    section = DOC.read_text().split("## Child tasks", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert source.startswith("# counting_agents.py\n")
    return source


@pytest.fixture
def counting_agents(settings, tmp_path, monkeypatch):
    """The example saved as counting_agents.py and named in OUTLAST_AGENTS, registered
    before the worker starts (a worker takes the steps of the versions it has then)."""
    (tmp_path / "counting_agents.py").write_text(example_module_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    settings_mod.configure(settings.replace(agents=(*settings.agents, "counting_agents")))
    registry.load()
    yield
    sys.modules.pop("counting_agents", None)


def test_docs_children_example_totals_the_words_and_lists_the_failed_child(
    counting_agents, celery_worker, tasks
):
    # Given three texts, the last with nothing to count (its child fails)
    texts = ["one two three", "four five", "   "]

    # When the example's parent runs them as child tasks
    parent_id = tasks.submit("total_words", {"texts": texts})
    done = tasks.wait_status(parent_id, ("completed", "failed"), timeout=60)

    # Then it completes: the failed child did not fail it, and is named
    kids = tasks.rows(
        "SELECT id, status::text AS status, result FROM tasks WHERE parent_id = :p "
        "ORDER BY created_at, id",
        p=parent_id,
    )
    assert done["status"] == "completed", done["error"]
    assert [k["status"] for k in kids] == ["completed", "completed", "failed"]
    assert done["result"] == {"total": 5, "failed": [kids[2]["id"]]}
    assert done["step"] == 2
