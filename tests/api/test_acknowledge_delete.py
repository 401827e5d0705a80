"""POST /v1/tasks/{id}/ack, ?acknowledged= on the list, and DELETE /v1/tasks/{id} (V2.md
section 4), checked against the rows in the database."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa

from app.store import db, outbox
from app.webhooks import sender
from tests.api.conftest import (
    ask_for_input,
    assert_problem,
    checkpoint,
    complete,
    fail,
    start,
    submit,
)
from tests.engine.servers import LocalServer, json_answer
from tests.ops.conftest import sample

# Every table that holds rows about one task, and how to count that task's rows in it.
ROWS_ABOUT_A_TASK = {
    "tasks": "SELECT count(*) FROM tasks WHERE id = :id",
    "events": "SELECT count(*) FROM events WHERE task_id = :id",
    "checkpoints": "SELECT count(*) FROM checkpoints WHERE task_id = :id",
    "tool_calls": "SELECT count(*) FROM tool_calls WHERE task_id = :id",
    "webhook_deliveries": "SELECT count(*) FROM webhook_deliveries WHERE task_id = :id",
    "webhook_attempts": "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d "
    "ON d.id = a.delivery_id WHERE d.task_id = :id",
    "attempts_by_delivery_id": "SELECT count(*) FROM webhook_attempts "
    "WHERE delivery_id = ANY(:deliveries)",
    "idempotency_keys": "SELECT count(*) FROM idempotency_keys WHERE task_id = :id "
    "OR (tenant_id, key) = (:tenant_id, :key)",
    "step_messages": "SELECT count(*) FROM outbox WHERE task_id = :id",
    "delivery_messages": "SELECT count(*) FROM outbox WHERE args->>0 = ANY(:deliveries)",
}


def scalar(sql: str, **params: Any) -> Any:
    with db.engine().begin() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def rows_about(task_id: str, tenant_id: str, key: str, deliveries: list[str]) -> dict[str, int]:
    params = {"id": task_id, "tenant_id": tenant_id, "key": key, "deliveries": deliveries}
    return {table: scalar(sql, **params) for table, sql in ROWS_ABOUT_A_TASK.items()}


def ack(client, auth, task_id: str):
    return client.post(f"/v1/tasks/{task_id}/ack", headers=auth)


def listed(client, auth, **query: str) -> list[str]:
    response = client.get("/v1/tasks", query_string=query, headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    return [task["id"] for task in response.get_json()["data"]]


# --- acknowledgement ---------------------------------------------------------------------


def test_a_new_task_is_not_acknowledged(client, auth):
    task = submit(client, auth)
    assert task["acknowledged_at"] is None


def test_acknowledging_twice_keeps_the_first_acknowledgement_time(client, auth):
    task = submit(client, auth)
    complete(task["id"], {"answer": 42})

    first = ack(client, auth, task["id"])
    time.sleep(0.01)
    again = ack(client, auth, task["id"])

    assert first.status_code == 200, first.get_data(as_text=True)
    body = first.get_json()
    assert body["status"] == "completed" and body["result"] == {"answer": 42}
    assert body["acknowledged_at"] is not None
    assert again.status_code == 200
    assert again.get_json()["acknowledged_at"] == body["acknowledged_at"]
    read = client.get(f"/v1/tasks/{task['id']}", headers=auth)
    assert read.get_json()["acknowledged_at"] == body["acknowledged_at"]
    assert read.headers["ETag"] == first.headers["ETag"]


def test_failed_and_cancelled_tasks_can_be_acknowledged(client, auth):
    failed, cancelled = submit(client, auth), submit(client, auth)
    fail(failed["id"])
    client.post(f"/v1/tasks/{cancelled['id']}/cancel", headers=auth)

    for task in (failed, cancelled):
        response = ack(client, auth, task["id"])
        assert response.status_code == 200
        assert response.get_json()["acknowledged_at"] is not None


def test_acknowledging_a_task_still_running_is_409_task_not_terminal(client, auth):
    pending, working, waiting = submit(client, auth), submit(client, auth), submit(client, auth)
    start(working["id"])
    ask_for_input(waiting["id"])

    for task in (pending, working, waiting):
        body = assert_problem(ack(client, auth, task["id"]), 409, "task_not_terminal")
        assert "acknowledged" in body["detail"]
        read = client.get(f"/v1/tasks/{task['id']}", headers=auth).get_json()
        assert read["acknowledged_at"] is None


def test_acknowledging_an_unknown_or_another_tenants_task_is_404(client, auth, other_auth):
    theirs = submit(client, other_auth)
    complete(theirs["id"])

    assert_problem(ack(client, auth, theirs["id"]), 404, "not_found")
    assert_problem(ack(client, auth, "tsk_nope"), 404, "not_found")
    assert_problem(ack(client, auth, "x" * 300), 404, "not_found")
    assert (
        client.get(f"/v1/tasks/{theirs['id']}", headers=other_auth).get_json()["acknowledged_at"]
        is None
    )


def test_the_list_filters_acknowledged_and_unacknowledged_results(client, auth, other_auth):
    pending = submit(client, auth)
    acked = submit(client, auth)
    complete(acked["id"])
    ack(client, auth, acked["id"])
    unacked_done = submit(client, auth)
    complete(unacked_done["id"])
    unacked_failed = submit(client, auth)
    fail(unacked_failed["id"])
    theirs = submit(client, other_auth)
    complete(theirs["id"])

    assert listed(client, auth, acknowledged="false") == [unacked_failed["id"], unacked_done["id"]]
    assert listed(client, auth, acknowledged="true") == [acked["id"]]
    assert listed(client, auth, acknowledged="false", status="failed") == [unacked_failed["id"]]
    assert listed(client, auth, acknowledged="false", status="pending") == []
    assert set(listed(client, auth)) == {
        pending["id"],
        acked["id"],
        unacked_done["id"],
        unacked_failed["id"],
    }
    # Cursor paging keeps the filter.
    page = client.get("/v1/tasks?acknowledged=false&limit=1", headers=auth).get_json()
    assert [t["id"] for t in page["data"]] == [unacked_failed["id"]]
    rest = client.get(
        f"/v1/tasks?acknowledged=false&limit=1&cursor={page['next_cursor']}", headers=auth
    ).get_json()
    assert [t["id"] for t in rest["data"]] == [unacked_done["id"]]
    assert rest["next_cursor"] is None

    ack(client, auth, unacked_done["id"])
    assert listed(client, auth, acknowledged="false") == [unacked_failed["id"]]


def test_an_acknowledged_filter_that_is_not_a_boolean_is_422(client, auth):
    body = assert_problem(
        client.get("/v1/tasks?acknowledged=maybe", headers=auth), 422, "validation_error"
    )
    assert "acknowledged" in body["errors"]


def test_an_unknown_list_filter_is_refused_rather_than_ignored(client, auth):
    body = assert_problem(
        client.get("/v1/tasks?acknowleged=false", headers=auth), 422, "validation_error"
    )
    assert "acknowleged" in body["errors"]


def test_the_openapi_document_describes_ack_delete_and_the_filter(client):
    paths = client.get("/openapi.json").get_json()["paths"]

    ack_doc = paths["/v1/tasks/{task_id}/ack"]["post"]
    assert {"200", "404", "409"} <= set(ack_doc["responses"])
    delete_doc = paths["/v1/tasks/{task_id}"]["delete"]
    assert {"204", "404", "409"} <= set(delete_doc["responses"])
    filters = {p["name"]: p for p in paths["/v1/tasks"]["get"]["parameters"]}
    assert filters["acknowledged"]["schema"]["type"] == "boolean"
    task_schema = client.get("/openapi.json").get_json()["components"]["schemas"]["Task"]
    assert "acknowledged_at" in task_schema["required"]


def test_the_unacknowledged_list_is_served_by_its_partial_index(client, auth, tenant, other_tenant):
    # Another tenant's 20,000 finished results, and 100 of ours, one in ten unacknowledged.
    bulk = (
        "INSERT INTO tasks (id, tenant_id, agent, status, result, finished_at, "
        "created_at, acknowledged_at) SELECT :prefix || n, :t, 'echo', 'completed', '{}', "
        "now(), now() - make_interval(secs => n), "
        "CASE WHEN n % 10 = 0 THEN NULL ELSE now() END FROM generate_series(1, :n) n"
    )
    with db.engine().begin() as conn:
        conn.execute(
            sa.text(bulk), {"prefix": "tsk_theirs", "t": other_tenant.tenant_id, "n": 20000}
        )
        conn.execute(sa.text(bulk), {"prefix": "tsk_ours", "t": tenant.tenant_id, "n": 100})
        conn.execute(sa.text("ANALYZE tasks"))
        plan = "\n".join(
            conn.execute(
                sa.text(
                    "EXPLAIN SELECT * FROM tasks WHERE tenant_id = :t AND acknowledged_at IS NULL "
                    "AND status IN ('completed', 'failed', 'cancelled') "
                    "ORDER BY created_at DESC, id DESC LIMIT 21"
                ),
                {"t": tenant.tenant_id},
            ).scalars()
        )
    assert "tasks_tenant_unacknowledged" in plan, plan
    ours = listed(client, auth, acknowledged="false", limit="100")
    assert ours == [f"tsk_ours{n}" for n in range(10, 101, 10)]


# --- deletion ----------------------------------------------------------------------------


def a_task_with_a_row_in_every_table(client, auth, key: str) -> tuple[dict[str, Any], list[str]]:
    """A completed task with events, checkpoints, tool calls, a webhook delivery and its
    attempt, its Idempotency-Key, and unpublished step and delivery messages; returns it
    and its delivery ids."""
    body = {
        "agent": "echo",
        "input": {"message": key},
        "webhook_url": "http://127.0.0.1:9/hook",
    }
    response = client.post("/v1/tasks", json=body, headers={**auth, "Idempotency-Key": key})
    assert response.status_code == 202
    task = response.get_json()
    token = start(task["id"])
    checkpoint(task["id"], 0, token, calls=2)
    complete_after_checkpoint(task["id"])
    with db.engine().begin() as conn:
        deliveries = list(
            conn.execute(
                sa.text("SELECT id FROM webhook_deliveries WHERE task_id = :id"), {"id": task["id"]}
            ).scalars()
        )
        assert deliveries
        conn.execute(
            sa.text("INSERT INTO webhook_attempts (delivery_id, attempt) VALUES (:d, 1)"),
            {"d": deliveries[0]},
        )
        # Messages not yet published (as when the broker is down).
        conn.execute(
            sa.text(
                "INSERT INTO outbox (task_name, queue, args, task_id) VALUES "
                "('outlast.run_step', 'steps', CAST(:step AS jsonb), :id), "
                "('outlast.deliver_webhook', 'webhooks', CAST(:dlv AS jsonb), NULL)"
            ),
            {
                "id": task["id"],
                "step": json.dumps([task["id"], 1]),
                "dlv": json.dumps([deliveries[0]]),
            },
        )
    # Rows of messages this process published are deleted in bulk a moment later; delete
    # them now, so two tasks made by this function have the same rows whenever counted.
    outbox.sent_rows.flush()
    return task, deliveries


def complete_after_checkpoint(task_id: str) -> None:
    from app.store import lifecycle

    with db.transaction() as conn:
        assert lifecycle.complete(conn, task_id, {"ok": True})


def test_delete_removes_every_row_about_the_task_and_nothing_else(client, auth, tenant):
    task, deliveries = a_task_with_a_row_in_every_table(client, auth, "doomed")
    kept, kept_deliveries = a_task_with_a_row_in_every_table(client, auth, "kept")
    before = rows_about(task["id"], tenant.tenant_id, "doomed", deliveries)
    assert all(before.values()), before  # the fixture really wrote a row everywhere

    response = client.delete(f"/v1/tasks/{task['id']}", headers=auth)

    assert response.status_code == 204, response.get_data(as_text=True)
    assert response.get_data() == b""
    after = rows_about(task["id"], tenant.tenant_id, "doomed", deliveries)
    assert after == dict.fromkeys(ROWS_ABOUT_A_TASK, 0)
    assert rows_about(kept["id"], tenant.tenant_id, "kept", kept_deliveries) == before
    assert_problem(client.get(f"/v1/tasks/{task['id']}", headers=auth), 404, "not_found")
    assert_problem(client.delete(f"/v1/tasks/{task['id']}", headers=auth), 404, "not_found")


def test_after_a_delete_the_old_idempotency_key_creates_a_new_task(client, auth):
    body = {"agent": "echo", "input": {"message": "once"}}
    headers = {**auth, "Idempotency-Key": "order-17"}
    first = client.post("/v1/tasks", json=body, headers=headers).get_json()
    complete(first["id"])
    replay = client.post("/v1/tasks", json=body, headers=headers)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.get_json()["id"] == first["id"]

    assert client.delete(f"/v1/tasks/{first['id']}", headers=auth).status_code == 204
    fresh = client.post("/v1/tasks", json=body, headers=headers)

    assert fresh.status_code == 202
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.get_json()["id"] != first["id"]
    assert fresh.get_json()["status"] == "pending"
    again = client.post("/v1/tasks", json=body, headers=headers)
    assert again.get_json()["id"] == fresh.get_json()["id"]  # the key works as before


def test_deleting_a_task_still_running_is_409_and_keeps_it(client, auth):
    pending, working, waiting = submit(client, auth), submit(client, auth), submit(client, auth)
    start(working["id"])
    ask_for_input(waiting["id"])

    for task in (pending, working, waiting):
        body = assert_problem(
            client.delete(f"/v1/tasks/{task['id']}", headers=auth), 409, "task_not_terminal"
        )
        assert "deleted" in body["detail"]
        assert client.get(f"/v1/tasks/{task['id']}", headers=auth).status_code == 200


def test_deleting_an_unknown_or_another_tenants_task_is_404_and_keeps_it(client, auth, other_auth):
    theirs = submit(client, other_auth)
    complete(theirs["id"])

    assert_problem(client.delete(f"/v1/tasks/{theirs['id']}", headers=auth), 404, "not_found")
    assert_problem(client.delete("/v1/tasks/tsk_nope", headers=auth), 404, "not_found")
    assert_problem(client.delete("/v1/tasks/" + "x" * 300, headers=auth), 404, "not_found")
    assert client.get(f"/v1/tasks/{theirs['id']}", headers=other_auth).status_code == 200


def test_a_deleted_tasks_webhook_is_never_sent(client, auth, settings):
    receiver = LocalServer(lambda r: json_answer(200, {}))
    try:
        body = {"agent": "echo", "input": {"message": "m"}, "webhook_url": receiver.url + "/h"}
        task = client.post("/v1/tasks", json=body, headers=auth).get_json()
        complete(task["id"])  # its task.completed delivery is due now
        delivery_id = scalar("SELECT id FROM webhook_deliveries WHERE task_id = :id", id=task["id"])
        assert client.delete(f"/v1/tasks/{task['id']}", headers=auth).status_code == 204

        # The deliver message already on the broker, and the retry sweep, send nothing.
        assert sender.attempt_delivery(delivery_id, settings) == "skipped"
        assert sender.dispatch_due(settings) == 0
        assert receiver.requests == []
    finally:
        receiver.close()


def test_a_delivery_claimed_before_the_delete_records_its_attempt_without_error(
    client, auth, settings
):
    body = {"agent": "echo", "input": {"message": "m"}, "webhook_url": "http://127.0.0.1:9/h"}
    task = client.post("/v1/tasks", json=body, headers=auth).get_json()
    complete(task["id"])
    delivery_id = scalar("SELECT id FROM webhook_deliveries WHERE task_id = :id", id=task["id"])
    claimed = sender.claim(delivery_id, settings)  # a sender is mid-send...
    assert claimed is not None

    assert client.delete(f"/v1/tasks/{task['id']}", headers=auth).status_code == 204

    # ...and its outcome lands on rows that are gone: nothing is written back.
    assert sender.record(claimed, sender.Outcome(True, status_code=200), settings) == "superseded"
    assert (
        scalar("SELECT count(*) FROM webhook_attempts WHERE delivery_id = :d", d=delivery_id) == 0
    )


def test_deletions_are_counted_in_the_metrics(client, auth):
    first, second = submit(client, auth), submit(client, auth)
    for task in (first, second):
        complete(task["id"])
        assert client.delete(f"/v1/tasks/{task['id']}", headers=auth).status_code == 204
    client.delete(f"/v1/tasks/{first['id']}", headers=auth)  # a 404 is not a deletion

    scraped = client.get("/metrics").get_data(as_text=True)
    assert sample(scraped, "outlast_tasks_deleted_total", reason="request") == 2
