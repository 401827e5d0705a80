"""docs/agents.md's child-task example, run as written by a real worker."""

from __future__ import annotations

import pytest

from tests.engine.doc_examples import register_example


@pytest.fixture
def counting_agents(settings, tmp_path, monkeypatch):
    yield from register_example(settings, tmp_path, monkeypatch, "Child tasks", "counting_agents")


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
