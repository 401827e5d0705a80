"""Events are bounded: ``data.task`` carries no ``input`` (stored, paged, streamed and
posted to webhooks), and an event page is at most 1,000 events and 4 MiB."""

from __future__ import annotations

import json

import sqlalchemy as sa

from app.api.events import MAX_PAGE_BYTES
from app.store import db, lifecycle
from tests.api.conftest import start, submit
from tests.harness import wait_until
from tests.webhooks.receiver import Receiver

BIG_INPUT = {"message": "x" * 60_000, "steps": 3}


def test_events_and_webhook_bodies_carry_the_task_without_its_input(client, auth, celery_worker):
    # Given a task with a large input and a webhook receiver
    with Receiver() as receiver:
        task = submit(client, auth, input=BIG_INPUT, webhook_url=receiver.url)
        # When it runs to completion
        wait_until(
            lambda: (
                client.get(f"/v1/tasks/{task['id']}", headers=auth).get_json()["status"]
                == "completed"
            ),
            timeout=60,
            what="task completed",
        )
        wait_until(lambda: receiver.requests, timeout=30, what="webhook")
        hooked = json.loads(receiver.requests[0].body)
    # Then the task itself still has its input
    assert client.get(f"/v1/tasks/{task['id']}", headers=auth).get_json()["input"] == BIG_INPUT
    # And no event has it: not the stored snapshot, not the page, not the stream, not the webhook
    with db.engine().connect() as conn:
        stored = conn.execute(
            sa.text("SELECT data FROM events WHERE task_id = :t ORDER BY seq"), {"t": task["id"]}
        ).scalars()
        stored = list(stored)
    assert len(stored) >= 5
    assert all("input" not in data["task"] and data["task"]["id"] == task["id"] for data in stored)
    page = client.get(f"/v1/tasks/{task['id']}/events", headers=auth).get_json()
    assert all("input" not in event["data"]["task"] for event in page["data"])
    assert page["data"][-1]["data"]["task"]["result"]["message"] == BIG_INPUT["message"]
    stream = client.get(
        f"/v1/tasks/{task['id']}/events", headers={**auth, "Accept": "text/event-stream"}
    ).get_data(as_text=True)
    assert stream.count("data: ") == len(page["data"]) and '"input"' not in stream
    assert hooked["type"] == "task.completed" and "input" not in hooked["data"]["task"]


def test_an_older_event_stored_with_input_is_answered_without_it(client, auth):
    task = submit(client, auth)
    with db.transaction() as conn:  # as rows written before this change were
        conn.execute(
            sa.text(
                "UPDATE events SET data = jsonb_set(data, '{task,input}', '{\"old\": 1}') "
                "WHERE task_id = :t"
            ),
            {"t": task["id"]},
        )
    page = client.get(f"/v1/tasks/{task['id']}/events", headers=auth).get_json()
    assert page["data"] and all("input" not in e["data"]["task"] for e in page["data"])


def test_event_page_stops_at_4_mib_and_next_cursor_continues_it(client, auth):
    # Given a task with 60 progress events of about 100 KB each (about 6 MB in all)
    task_id = submit(client, auth)["id"]
    token = start(task_id)
    with db.transaction() as conn:
        for i in range(60):
            row = lifecycle.report_progress(
                conn, task_id, token, {"current": i, "total": 60, "message": "p" * 100_000}
            )
            assert row is not None
    # When the log is read with the largest page size
    seqs: list[int] = []
    pages = 0
    after = 0
    while True:
        response = client.get(f"/v1/tasks/{task_id}/events?limit=1000&after={after}", headers=auth)
        assert response.status_code == 200
        # Then no page is over 4 MiB, and next_cursor continues each until the end
        assert len(response.get_data()) <= MAX_PAGE_BYTES
        page = response.get_json()
        pages += 1
        seqs += [event["seq"] for event in page["data"]]
        if page["next_cursor"] is None:
            break
        assert page["next_cursor"] == str(page["data"][-1]["seq"])
        after = int(page["next_cursor"])
    assert pages == 2
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 62  # created, started, 60
    # And the SSE stream's batches are bounded the same way (it still sends every event)
    stream = client.get(
        f"/v1/tasks/{task_id}/events",
        headers={**auth, "Accept": "text/event-stream"},
        buffered=False,
    )
    ids = []
    for chunk in stream.response:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        ids += [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
        if len(ids) >= 62:
            break
    stream.close()
    assert ids == seqs


def test_event_page_is_at_most_1000_events(client, auth):
    # Given a task with 1,102 events
    task_id = submit(client, auth)["id"]
    token = start(task_id)
    with db.transaction() as conn:
        for i in range(1_100):
            assert lifecycle.report_progress(conn, task_id, token, {"current": i})
    # Then a page holds at most 1,000 of them, and next_cursor leads to the rest
    assert client.get(f"/v1/tasks/{task_id}/events?limit=1001", headers=auth).status_code == 422
    page = client.get(f"/v1/tasks/{task_id}/events?limit=1000", headers=auth).get_json()
    assert len(page["data"]) == 1_000 and page["next_cursor"] == "1000"
    rest = client.get(f"/v1/tasks/{task_id}/events?limit=1000&after=1000", headers=auth)
    assert [e["seq"] for e in rest.get_json()["data"]] == list(range(1001, 1103))
    assert rest.get_json()["next_cursor"] is None
