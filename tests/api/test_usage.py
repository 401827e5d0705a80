"""GET /v1/usage: the tenant's totals by agent and day, from each task's usage (which
counts every completed call once)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.store import db, tool_calls
from tests.api.conftest import assert_problem, start, submit


def spend(task_id: str, token: str, calls: list[tuple[str, dict]]) -> None:
    """Log and complete these calls in step 0 (as a worker does), then complete one of
    them again (a replay must not count twice)."""
    with db.transaction() as conn:
        for index, (name, output) in enumerate(calls):
            assert tool_calls.begin(
                conn,
                task_id=task_id,
                step=0,
                call_index=index,
                name=name,
                key=f"k-{task_id}-{index}",
                args={},
                lease_token=token,
            )
            assert tool_calls.complete(conn, task_id, 0, index, output) is not None
        assert tool_calls.complete(conn, task_id, 0, 0, calls[0][1]) is None


def model(prompt: int, completion: int) -> tuple[str, dict]:
    return "llm", {
        "message": {},
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }


def test_usage_adds_up_each_tasks_completed_calls_by_agent_and_day(client, auth, other_auth):
    # Given an echo task with two model calls and a tool call, and one with nothing
    echo = submit(client, auth, input={"message": "a"})
    spend(echo["id"], start(echo["id"]), [model(10, 2), model(5, 1), ("http_get", {"status": 200})])
    submit(client, auth, input={"message": "b"})
    # and a research task with one tool call; another tenant's task is not counted
    research = submit(
        client, auth, agent="research", input={"question": "q", "urls": ["https://example.com/"]}
    )
    spend(research["id"], start(research["id"]), [("http_get", {"status": 200})])
    other = submit(client, other_auth, input={"message": "c"})
    spend(other["id"], start(other["id"]), [model(1000, 1000)])

    task = client.get(f"/v1/tasks/{echo['id']}", headers=auth).get_json()
    assert task["usage"] == {
        "model_calls": 2,
        "tool_calls": 1,
        "input_tokens": 15,
        "output_tokens": 3,
    }

    today = datetime.now(UTC).date().isoformat()
    body = client.get("/v1/usage", headers=auth).get_json()
    assert body["object"] == "usage" and body["to"] == today and body["agent"] is None
    assert body["totals"] == {
        "tasks": 3,
        "model_calls": 2,
        "tool_calls": 2,
        "input_tokens": 15,
        "output_tokens": 3,
        "total_tokens": 18,
    }
    assert body["data"] == [
        {
            "day": today,
            "agent": "echo",
            "tasks": 2,
            "model_calls": 2,
            "tool_calls": 1,
            "input_tokens": 15,
            "output_tokens": 3,
            "total_tokens": 18,
        },
        {
            "day": today,
            "agent": "research",
            "tasks": 1,
            "model_calls": 0,
            "tool_calls": 1,
            "input_tokens": 0,
            "output_tokens": 0,
            "total_tokens": 0,
        },
    ]

    only = client.get("/v1/usage?agent=research", headers=auth).get_json()
    assert only["agent"] == "research" and only["totals"]["tasks"] == 1
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    before = client.get(f"/v1/usage?from={yesterday}&to={yesterday}", headers=auth).get_json()
    assert before["data"] == [] and before["totals"]["tasks"] == 0
    assert before["from"] == yesterday


def test_usage_query_out_of_range_is_a_422(client, auth):
    for query, field in [
        ("from=2026-13-01", "from"),
        ("to=yesterday", "to"),
        ("from=2026-12-02&to=2026-12-01", "from"),
        ("from=2020-01-01&to=2026-01-01", "from"),
        ("agent=", "agent"),
    ]:
        body = assert_problem(
            client.get(f"/v1/usage?{query}", headers=auth), 422, "validation_error"
        )
        assert field in body["errors"], (query, body["errors"])
    assert client.get("/v1/usage").status_code == 401


def test_usage_is_in_the_openapi_document(client):
    document = client.get("/openapi.json").get_json()
    operation = document["paths"]["/v1/usage"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"from", "to", "agent"}
    assert "200" in operation["responses"]
    task = document["components"]["schemas"]["Task"]
    assert {"usage", "budget"} <= set(task["properties"])
