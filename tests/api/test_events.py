"""GET /v1/tasks/{id}/events as JSON pages and as a Server-Sent Events stream."""

from __future__ import annotations

import json
import threading
import time

from app.store import db, lifecycle
from tests.api.conftest import assert_problem, checkpoint, start, submit

SSE = {"Accept": "text/event-stream"}


def parse_sse(text: str) -> list[dict]:
    """SSE blocks as ``{"event", "id", "data"}`` (comments skipped)."""
    blocks = []
    for raw in text.split("\n\n"):
        fields: dict = {}
        for line in raw.splitlines():
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if fields:
            fields["data"] = json.loads(fields["data"])
            blocks.append(fields)
    return blocks


def task_with_events(client, auth, steps: int) -> dict:
    """A task with 1 (created) + 1 (started) + ``steps`` step events, still working."""
    task = submit(client, auth)
    token = start(task["id"])
    for step in range(steps):
        token = checkpoint(task["id"], step, token)
    return task


def cancel(task_id: str, tenant_id: str) -> None:
    with db.transaction() as conn:
        assert lifecycle.cancel(conn, task_id, tenant_id)


def test_events_page_is_oldest_first_with_next_cursor(client, auth):
    task = task_with_events(client, auth, 3)  # seq 1..5
    first = client.get(f"/v1/tasks/{task['id']}/events?limit=2", headers=auth).get_json()
    assert [e["seq"] for e in first["data"]] == [1, 2]
    assert [e["type"] for e in first["data"]] == ["task.created", "task.started"]
    assert first["next_cursor"] == "2"
    second = client.get(
        f"/v1/tasks/{task['id']}/events?after={first['next_cursor']}&limit=2", headers=auth
    ).get_json()
    assert [e["seq"] for e in second["data"]] == [3, 4]
    last = client.get(
        f"/v1/tasks/{task['id']}/events?after={second['next_cursor']}", headers=auth
    ).get_json()
    assert [e["seq"] for e in last["data"]] == [5]
    assert last["next_cursor"] is None


def test_event_object_carries_the_task_right_after_the_change(client, auth):
    task = task_with_events(client, auth, 1)
    events = client.get(f"/v1/tasks/{task['id']}/events", headers=auth).get_json()["data"]
    assert set(events[0]) == {"id", "type", "task_id", "seq", "timestamp", "data"}
    assert events[0]["id"].startswith("evt_") and events[0]["task_id"] == task["id"]
    assert events[0]["data"]["task"]["status"] == "pending"
    assert events[1]["data"]["task"]["status"] == "working"
    assert events[2]["type"] == "task.step.completed" and events[2]["data"]["task"]["step"] == 1
    assert events[0]["timestamp"].endswith("Z")


def test_events_after_the_last_seq_is_an_empty_page(client, auth):
    task = submit(client, auth)
    page = client.get(f"/v1/tasks/{task['id']}/events?after=1", headers=auth).get_json()
    assert page == {"data": [], "next_cursor": None}


def test_events_query_out_of_range_is_422(client, auth):
    for query in ["limit=0", "limit=1001", "limit=x", "after=-1", "after=a"]:
        task = submit(client, auth)
        response = client.get(f"/v1/tasks/{task['id']}/events?{query}", headers=auth)
        problem = assert_problem(response, 422, "validation_error")
        assert query.split("=")[0] in problem["errors"]


def test_limit_1000_is_accepted(client, auth):
    task = submit(client, auth)
    assert client.get(f"/v1/tasks/{task['id']}/events?limit=1000", headers=auth).status_code == 200


def test_event_stream_of_a_finished_task_replays_everything_and_closes(client, auth, tenant):
    task = task_with_events(client, auth, 2)
    cancel(task["id"], tenant.tenant_id)
    response = client.get(f"/v1/tasks/{task['id']}/events", headers={**auth, **SSE})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    blocks = parse_sse(response.get_data(as_text=True))
    assert [int(b["id"]) for b in blocks] == [1, 2, 3, 4, 5]
    assert [b["event"] for b in blocks][-1] == "task.cancelled"
    assert all(b["event"] == b["data"]["type"] and int(b["id"]) == b["data"]["seq"] for b in blocks)


def test_event_stream_resumes_after_last_event_id(client, auth, tenant):
    task = task_with_events(client, auth, 2)
    cancel(task["id"], tenant.tenant_id)
    response = client.get(
        f"/v1/tasks/{task['id']}/events", headers={**auth, **SSE, "Last-Event-ID": "3"}
    )
    assert [int(b["id"]) for b in parse_sse(response.get_data(as_text=True))] == [4, 5]
    # Last-Event-ID wins over ?after (it is the reconnection's own position).
    response = client.get(
        f"/v1/tasks/{task['id']}/events?after=1", headers={**auth, **SSE, "Last-Event-ID": "4"}
    )
    assert [int(b["id"]) for b in parse_sse(response.get_data(as_text=True))] == [5]
    # Resuming after the terminal event: nothing more will come, the stream ends at once.
    response = client.get(
        f"/v1/tasks/{task['id']}/events", headers={**auth, **SSE, "Last-Event-ID": "5"}
    )
    assert parse_sse(response.get_data(as_text=True)) == []


def test_event_stream_honours_after_without_last_event_id(client, auth, tenant):
    task = task_with_events(client, auth, 1)
    cancel(task["id"], tenant.tenant_id)
    response = client.get(f"/v1/tasks/{task['id']}/events?after=2", headers={**auth, **SSE})
    assert [int(b["id"]) for b in parse_sse(response.get_data(as_text=True))] == [3, 4]


def test_malformed_last_event_id_is_422(client, auth):
    task = submit(client, auth)
    response = client.get(
        f"/v1/tasks/{task['id']}/events", headers={**auth, **SSE, "Last-Event-ID": "evt_x"}
    )
    assert "Last-Event-ID" in assert_problem(response, 422, "validation_error")["errors"]


def test_event_stream_of_unknown_task_is_404_problem(client, auth):
    assert_problem(
        client.get("/v1/tasks/tsk_nope/events", headers={**auth, **SSE}), 404, "not_found"
    )


def test_json_is_the_default_when_accept_allows_both(client, auth):
    task = submit(client, auth)
    for accept in ["*/*", "application/json, text/event-stream;q=0.5", "text/html"]:
        response = client.get(f"/v1/tasks/{task['id']}/events", headers={**auth, "Accept": accept})
        assert response.mimetype == "application/json", accept


def test_live_event_stream_delivers_new_events_and_closes_after_the_terminal_one(
    client, auth, tenant
):
    task = submit(client, auth)
    token = start(task["id"])

    def progress_then_cancel() -> None:
        time.sleep(0.3)
        checkpoint(task["id"], 0, token)
        time.sleep(0.3)
        cancel(task["id"], tenant.tenant_id)

    thread = threading.Thread(target=progress_then_cancel)
    response = client.get(f"/v1/tasks/{task['id']}/events", headers={**auth, **SSE}, buffered=False)
    thread.start()
    began = time.monotonic()
    text = "".join(chunk.decode() for chunk in response.response)  # ends when the server closes
    elapsed = time.monotonic() - began
    thread.join()
    types = [b["event"] for b in parse_sse(text)]
    assert types == ["task.created", "task.started", "task.step.completed", "task.cancelled"]
    assert [int(b["id"]) for b in parse_sse(text)] == [1, 2, 3, 4]
    assert elapsed < 5


def test_echo_task_streams_to_completion_over_gunicorn_and_resumes_from_last_event_id(
    stack, tenant
):
    import requests

    stack.start("web", {"WEB_CONCURRENCY": "1", "OUTLAST_WEB_THREADS": "4"})
    worker = stack.start("worker", {"OUTLAST_WORKER_CONCURRENCY": "1"})
    stack.wait_ready()
    stack.wait_worker_ready(worker)
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    url = stack.base_url + "/v1/tasks"
    body = {"agent": "echo", "input": {"message": "hi", "steps": 3, "step_seconds": 0.2}}
    task = requests.post(url, json=body, headers=auth, timeout=10).json()

    # Read the live stream until the first step completes, then drop the connection.
    seen: list[dict] = []
    with requests.get(
        f"{url}/{task['id']}/events", headers={**auth, **SSE}, stream=True, timeout=30
    ) as stream:
        buffer = ""
        for chunk in stream.iter_content(chunk_size=None, decode_unicode=True):
            buffer += chunk
            *complete_blocks, buffer = buffer.split("\n\n")
            seen.extend(parse_sse("\n\n".join(complete_blocks)))
            if any(b["event"] == "task.step.completed" for b in seen):
                break
    last_id = seen[-1]["id"]

    # Reconnect with Last-Event-ID: the rest arrives, with no repeat and no gap.
    resumed = requests.get(
        f"{url}/{task['id']}/events",
        headers={**auth, **SSE, "Last-Event-ID": last_id},
        timeout=30,
    )
    rest = parse_sse(resumed.text)
    seqs = [int(b["id"]) for b in seen + rest]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert rest[-1]["event"] == "task.completed", stack.logs()
    assert rest[-1]["data"]["data"]["task"]["result"] == {"message": "hi", "steps": 3}
    replay = requests.get(f"{url}/{task['id']}/events?limit=1000", headers=auth, timeout=10).json()
    assert [e["seq"] for e in replay["data"]] == seqs
