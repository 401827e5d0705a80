"""GET /v1/tasks/{id}/deliveries, POST …/deliveries/replay, POST /v1/webhook-secret/rotate."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from standardwebhooks import Webhook, WebhookVerificationError

from app.store import db, tenants
from tests.harness import wait_until
from tests.webhooks.helpers import body_json, deliveries, finish_task, verify_with_reference

DELIVERY_KEYS = {
    "id",
    "event_id",
    "event_type",
    "url",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "next_attempt_at",
    "delivered_at",
}


@pytest.fixture
def other_auth(settings) -> dict[str, str]:
    with db.transaction() as conn:
        other = tenants.create(conn, f"other-{uuid.uuid4().hex[:8]}")
    return {"Authorization": f"Bearer {other.api_key}"}


def _all_delivered(task_id: str, n: int):
    rows = deliveries(task_id)
    return len(rows) == n and all(r["status"] == "delivered" for r in rows)


def test_deliveries_list_shows_each_delivery_as_api_md_describes(
    client, auth, tenant, celery_worker, make_receiver
):
    receiver = make_receiver()
    task_id = finish_task(tenant.tenant_id, receiver.url, "completed")
    wait_until(lambda: _all_delivered(task_id, 1), 20, what="delivered")

    response = client.get(f"/v1/tasks/{task_id}/deliveries", headers=auth)
    assert response.status_code == 200
    (item,) = response.get_json()["data"]
    assert set(item) == DELIVERY_KEYS
    assert item["id"].startswith("dlv_")
    assert item["event_id"] == receiver.requests[0].headers["webhook-id"]
    assert item["event_type"] == "task.completed"
    assert item["url"] == receiver.url
    assert (item["status"], item["attempts"], item["last_status_code"]) == ("delivered", 1, 200)
    assert item["last_error"] is None and item["next_attempt_at"] is None
    assert item["delivered_at"].endswith("Z")


def test_deliveries_list_of_a_pending_failing_delivery_shows_the_error_and_next_attempt(
    client, auth, tenant, celery_worker, make_receiver
):
    from tests.webhooks.receiver import always

    receiver = make_receiver(always(500))
    task_id = finish_task(tenant.tenant_id, receiver.url, "failed")
    wait_until(lambda: deliveries(task_id)[0]["attempts"] == 1 and receiver.count() == 1, 20)
    wait_until(lambda: deliveries(task_id)[0]["last_status_code"] == 500, 10)

    (item,) = client.get(f"/v1/tasks/{task_id}/deliveries", headers=auth).get_json()["data"]
    assert item["status"] == "pending" and item["event_type"] == "task.failed"
    assert item["last_status_code"] == 500 and item["last_error"] == "HTTP 500"
    assert item["next_attempt_at"].endswith("Z") and item["delivered_at"] is None


def test_deliveries_of_a_task_without_webhook_url_is_an_empty_list(client, auth, tenant):
    task_id = finish_task(tenant.tenant_id, None, "cancelled")
    response = client.get(f"/v1/tasks/{task_id}/deliveries", headers=auth)
    assert response.status_code == 200 and response.get_json() == {"data": []}


@pytest.mark.parametrize("path", ["deliveries", "deliveries/replay"])
def test_another_tenants_task_answers_404_like_an_unknown_id(
    path, client, auth, other_auth, tenant
):
    task_id = finish_task(tenant.tenant_id, "http://127.0.0.1:9/x", "cancelled")
    method = client.get if path == "deliveries" else client.post
    theirs = method(f"/v1/tasks/{task_id}/{path}", headers=other_auth)
    unknown = method(f"/v1/tasks/tsk_doesnotexist/{path}", headers=auth)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.get_json()["code"] == unknown.get_json()["code"] == "not_found"
    assert len(deliveries(task_id)) == 1  # the replay attempt created nothing


def test_webhook_endpoints_need_an_api_key(client):
    for method, path in [
        ("get", "/v1/tasks/tsk_x/deliveries"),
        ("post", "/v1/tasks/tsk_x/deliveries/replay"),
        ("post", "/v1/webhook-secret/rotate"),
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_replay_resends_with_the_same_ids_and_fresh_valid_signatures(
    client, auth, tenant, celery_worker, make_receiver
):
    receiver = make_receiver()
    task_id = finish_task(tenant.tenant_id, receiver.url, "input_required")
    with db.transaction() as conn:  # then the task is cancelled: a second webhook event
        from app.store import lifecycle

        lifecycle.cancel(conn, task_id, tenant.tenant_id)
    wait_until(lambda: _all_delivered(task_id, 2), 20, what="two deliveries")
    first = {r.headers["webhook-id"]: r for r in receiver.requests}
    time.sleep(1.1)  # so the replay's unix-seconds timestamps are strictly newer

    response = client.post(f"/v1/tasks/{task_id}/deliveries/replay", headers=auth)
    assert response.status_code == 202
    created = response.get_json()["data"]
    assert [d["event_type"] for d in created] == ["task.input_required", "task.cancelled"]
    assert all(set(d) == DELIVERY_KEYS and d["status"] == "pending" for d in created)
    assert {d["event_id"] for d in created} == set(first)
    wait_until(lambda: _all_delivered(task_id, 4), 20, what="replays delivered")

    replayed = receiver.requests[2:]
    assert {r.headers["webhook-id"] for r in replayed} == set(first)
    for request in replayed:
        original = first[request.headers["webhook-id"]]
        assert verify_with_reference(tenant.webhook_secret, request) == body_json(original)
        assert request.body == original.body
        assert int(request.headers["webhook-timestamp"]) > int(
            original.headers["webhook-timestamp"]
        )
        assert request.headers["webhook-signature"] != original.headers["webhook-signature"]


def test_replay_after_a_seq_sends_only_later_events(
    client, auth, tenant, celery_worker, make_receiver
):
    receiver = make_receiver()
    task_id = finish_task(tenant.tenant_id, receiver.url, "input_required")
    with db.transaction() as conn:
        from app.store import lifecycle

        lifecycle.cancel(conn, task_id, tenant.tenant_id)
    wait_until(lambda: _all_delivered(task_id, 2), 20, what="two deliveries")
    input_required_seq = deliveries(task_id)[0]["event_seq"]

    response = client.post(
        f"/v1/tasks/{task_id}/deliveries/replay", json={"after": input_required_seq}, headers=auth
    )
    assert response.status_code == 202
    assert [d["event_type"] for d in response.get_json()["data"]] == ["task.cancelled"]
    wait_until(lambda: _all_delivered(task_id, 3), 20, what="replay delivered")
    assert body_json(receiver.requests[-1])["type"] == "task.cancelled"

    everything_seen = client.post(
        f"/v1/tasks/{task_id}/deliveries/replay", json={"after": 1000}, headers=auth
    )
    assert everything_seen.status_code == 202 and everything_seen.get_json() == {"data": []}


def test_replay_of_a_task_without_webhook_url_creates_nothing(client, auth, tenant):
    task_id = finish_task(tenant.tenant_id, None, "completed")
    response = client.post(f"/v1/tasks/{task_id}/deliveries/replay", headers=auth)
    assert response.status_code == 202 and response.get_json() == {"data": []}


def test_replay_refuses_a_bad_body_with_a_problem(client, auth, tenant):
    task_id = finish_task(tenant.tenant_id, "http://127.0.0.1:9/x", "completed")
    for kwargs, status, code in [
        ({"json": {"after": -1}}, 422, "validation_error"),
        ({"json": {"after": "3"}}, 422, "validation_error"),
        ({"json": {"after": 1.5}}, 422, "validation_error"),
        ({"json": {"since": 1}}, 422, "validation_error"),
        ({"json": [1]}, 422, "validation_error"),
        ({"data": "{not json", "content_type": "application/json"}, 400, "invalid_json"),
        ({"data": "after=1", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ]:
        response = client.post(f"/v1/tasks/{task_id}/deliveries/replay", headers=auth, **kwargs)
        assert response.status_code == status, (kwargs, response.get_json())
        assert response.content_type == "application/problem+json"
        body = response.get_json()
        assert body["code"] == code
        if status == 422:
            assert body["errors"], kwargs
    assert len(deliveries(task_id)) == 1


def test_rotated_secret_signs_alongside_the_previous_one_for_24_hours(
    client, auth, tenant, celery_worker, make_receiver
):
    response = client.post("/v1/webhook-secret/rotate", headers=auth)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    new_secret = response.get_json()["webhook_secret"]
    assert new_secret.startswith("whsec_") and new_secret != tenant.webhook_secret
    assert len(Webhook(new_secret)._whsecret) == 32

    receiver = make_receiver()
    task_id = finish_task(tenant.tenant_id, receiver.url, "completed")
    wait_until(lambda: _all_delivered(task_id, 1), 20, what="delivered")
    request = receiver.requests[0]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    # Receivers holding either secret verify it, with the reference package.
    verify_with_reference(new_secret, request)
    verify_with_reference(tenant.webhook_secret, request)

    with db.engine().connect() as conn:
        expiry = conn.execute(
            sa.text("SELECT expires_at FROM webhook_secrets WHERE tenant_id = :t AND secret = :s"),
            {"t": tenant.tenant_id, "s": tenant.webhook_secret},
        ).scalar_one()
    assert abs(expiry - (datetime.now(UTC) + timedelta(hours=24))) < timedelta(minutes=1)


def test_a_rotated_out_secret_stops_signing_once_its_24_hours_are_over(
    client, auth, tenant, celery_worker, make_receiver
):
    new_secret = client.post("/v1/webhook-secret/rotate", headers=auth).get_json()["webhook_secret"]
    with db.transaction() as conn:  # the 24 hours have passed
        conn.execute(
            sa.text(
                "UPDATE webhook_secrets SET expires_at = now() - interval '1 second' "
                "WHERE tenant_id = :t AND secret = :s"
            ),
            {"t": tenant.tenant_id, "s": tenant.webhook_secret},
        )
    receiver = make_receiver()
    task_id = finish_task(tenant.tenant_id, receiver.url, "completed")
    wait_until(lambda: _all_delivered(task_id, 1), 20, what="delivered")
    request = receiver.requests[0]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    verify_with_reference(new_secret, request)
    with pytest.raises(WebhookVerificationError):
        verify_with_reference(tenant.webhook_secret, request)


def test_rotation_is_per_tenant(client, auth, other_auth, tenant):
    client.post("/v1/webhook-secret/rotate", headers=other_auth)
    with db.engine().connect() as conn:
        mine = conn.execute(
            sa.text("SELECT secret, expires_at FROM webhook_secrets WHERE tenant_id = :t"),
            {"t": tenant.tenant_id},
        ).all()
    assert [(s, e) for s, e in mine] == [(tenant.webhook_secret, None)]
