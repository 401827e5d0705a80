"""Delivering webhooks to a real local receiver through a real Celery worker.

Every delivered request is verified with the ``standardwebhooks`` reference package.
Tasks are driven to their webhook events with the lifecycle functions (the same
transactions the engine uses), so these tests do not depend on any agent.
"""

from __future__ import annotations

import time

import pytest

from tests.harness import wait_until
from tests.webhooks.helpers import (
    attempts,
    body_json,
    deliveries,
    finish_task,
    stored_event,
    verify_with_reference,
)
from tests.webhooks.receiver import Answer, always, fail_then_ok


def _delivered(task_id: str, n: int = 1):
    rows = deliveries(task_id)
    return rows if len(rows) == n and all(r["status"] == "delivered" for r in rows) else None


def _settled(task_id: str):
    rows = deliveries(task_id)
    return rows if rows and all(r["status"] != "pending" for r in rows) else None


def test_each_webhook_event_is_posted_signed_and_verifiable_with_the_reference_package(
    tenant, celery_worker, make_receiver
):
    hows = ["completed", "failed", "cancelled", "input_required"]
    receivers = {how: make_receiver() for how in hows}
    task_ids = {how: finish_task(tenant.tenant_id, receivers[how].url, how) for how in hows}

    for how in hows:
        receiver, task_id = receivers[how], task_ids[how]
        rows = wait_until(lambda t=task_id: _delivered(t), 20, what=f"{how} delivered")
        assert receiver.count() == 1, how
        request = receiver.requests[0]
        assert request.method == "POST" and request.path == "/hooks"
        assert request.headers["content-type"] == "application/json"
        event = verify_with_reference(tenant.webhook_secret, request)
        assert event["type"] == f"task.{how}"
        assert request.headers["webhook-id"] == event["id"] == rows[0]["event_id"]
        # The body is the stored event, exactly: the same object GET /events returns.
        assert event == stored_event(event["id"])
        assert event["data"]["task"]["status"] == how
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 10
        assert rows[0]["attempts"] == 1 and rows[0]["last_status_code"] == 200
        assert rows[0]["delivered_at"] is not None and rows[0]["next_attempt_at"] is None


def test_only_the_four_webhook_event_types_are_posted(tenant, celery_worker, make_receiver):
    receiver = make_receiver()
    # created, started, input_required ... then completed is not reachable here;
    # created + started + completed: only completed is a webhook event.
    task_id = finish_task(tenant.tenant_id, receiver.url, "completed")
    wait_until(lambda: _delivered(task_id), 20, what="delivered")
    time.sleep(0.5)
    assert [body_json(r)["type"] for r in receiver.requests] == ["task.completed"]


def test_task_without_webhook_url_gets_no_delivery(tenant, celery_worker):
    task_id = finish_task(tenant.tenant_id, None, "completed")
    assert deliveries(task_id) == []


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_RETRY_BASE_SECONDS="1")
def test_receiver_failing_twice_gets_three_attempts_with_one_id_and_growing_gaps(
    tenant, celery_worker, beat, make_receiver
):
    receiver = make_receiver(fail_then_ok(2))
    task_id = finish_task(tenant.tenant_id, receiver.url)

    rows = wait_until(lambda: _delivered(task_id), 30, what="delivered after retries")
    assert receiver.count() == 3
    assert rows[0]["attempts"] == 3
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert ids == {rows[0]["event_id"]}
    for request in receiver.requests:
        verify_with_reference(tenant.webhook_secret, request)
    # Each attempt is recorded; the two failures scheduled their retries 0.5-1 s and
    # 1-2 s later (base 1 s): the jittered bands double, so the gaps grow (the bands
    # touch at 1 s, which is why a strict comparison of two gaps is not asserted).
    tried = attempts(rows[0]["id"])
    assert [a["status_code"] for a in tried] == [500, 500, 200]
    assert [a["error"] for a in tried] == ["HTTP 500", "HTTP 500", None]
    assert tried[2]["retry_at"] is None
    # retry_at - (attempt start + its duration) is the scheduled delay plus the few
    # milliseconds of bookkeeping between the answer and the recording: never less.
    delays = [
        (a["retry_at"] - a["attempted_at"]).total_seconds() - a["duration_ms"] / 1000
        for a in tried[:2]
    ]
    assert 0.5 <= delays[0] <= 1.0 + 0.5
    assert 1.0 <= delays[1] <= 2.0 + 0.5
    # The receiver saw at least those waits (and no more than one sweep period later,
    # with room for a loaded machine).
    at = [r.at for r in receiver.requests]
    gaps = [at[1] - at[0], at[2] - at[1]]
    assert gaps[0] >= 0.5 - 0.05 and gaps[1] >= 1.0 - 0.05
    assert gaps[0] <= 1.0 + 3 and gaps[1] <= 2.0 + 3
    assert gaps[0] + gaps[1] >= 1.5 - 0.05


def test_receiver_answering_410_gets_no_more_attempts(tenant, celery_worker, beat, make_receiver):
    receiver = make_receiver(always(410))
    task_id = finish_task(tenant.tenant_id, receiver.url)

    rows = wait_until(lambda: _settled(task_id), 20, what="settled")
    assert rows[0]["status"] == "failed" and rows[0]["last_status_code"] == 410
    # Several retry periods later (base 0.2 s, sweep 0.5 s) nothing more was sent.
    time.sleep(2.5)
    assert receiver.count() == 1
    assert deliveries(task_id)[0]["attempts"] == 1


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_MAX_ATTEMPTS="4")
def test_receiver_down_for_the_whole_run_ends_failed_after_the_configured_attempts(
    tenant, celery_worker, beat
):
    from app.dev.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    task_id = finish_task(tenant.tenant_id, url)

    rows = wait_until(lambda: _settled(task_id), 30, what="failed")
    assert rows[0]["status"] == "failed"
    assert rows[0]["attempts"] == 4
    assert rows[0]["last_status_code"] is None
    assert rows[0]["last_error"] == "connection refused or not allowed"
    tried = attempts(rows[0]["id"])
    assert [a["attempt"] for a in tried] == [1, 2, 3, 4]
    assert all(a["error"] and a["status_code"] is None for a in tried)
    assert [a["retry_at"] is not None for a in tried] == [True, True, True, False]
    time.sleep(1.5)
    assert deliveries(task_id)[0]["attempts"] == 4


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_MAX_ATTEMPTS="3")
def test_redirect_is_a_failure_and_is_not_followed(tenant, celery_worker, beat, make_receiver):
    target = make_receiver()
    task_ids = {}
    for status in (302, 307):
        receiver = make_receiver(always(status, Location=target.url))
        task_ids[status] = finish_task(tenant.tenant_id, receiver.url)

    for status, task_id in task_ids.items():
        rows = wait_until(lambda t=task_id: _settled(t), 30, what=f"{status} failed")
        assert rows[0]["status"] == "failed" and rows[0]["attempts"] == 3
        assert rows[0]["last_status_code"] == status
        assert rows[0]["last_error"] == f"redirect ({status}) not followed"
    assert target.count() == 0


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_TIMEOUT_SECONDS="0.5", OUTLAST_WEBHOOK_MAX_ATTEMPTS="2")
def test_answer_slower_than_the_timeout_is_a_failed_attempt(
    tenant, celery_worker, beat, make_receiver
):
    receiver = make_receiver(lambda n: Answer(200, delay=1.5 if n == 0 else 0))
    task_id = finish_task(tenant.tenant_id, receiver.url)

    rows = wait_until(lambda: _settled(task_id), 30, what="settled")
    assert rows[0]["status"] == "delivered" and rows[0]["attempts"] == 2
    first = attempts(rows[0]["id"])[0]
    assert first["status_code"] is None and "timeout" in first["error"]


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_RETRY_BASE_SECONDS="0.1")
def test_retry_after_on_429_and_503_is_honoured_when_longer(
    tenant, celery_worker, beat, make_receiver
):
    receivers = {
        status: make_receiver(
            lambda n, status=status: Answer(status, {"Retry-After": "2"}) if n == 0 else Answer(200)
        )
        for status in (429, 503)
    }
    task_ids = {status: finish_task(tenant.tenant_id, r.url) for status, r in receivers.items()}

    for status, receiver in receivers.items():
        wait_until(lambda s=status: _delivered(task_ids[s]), 30, what=f"{status} delivered")
        gap = receiver.requests[1].at - receiver.requests[0].at
        assert gap >= 2 - 0.05, status  # not the 0.05-0.1 s of the schedule


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_RETRY_BASE_SECONDS="0.1")
def test_retry_after_on_other_statuses_is_ignored(tenant, celery_worker, beat, make_receiver):
    receiver = make_receiver(
        lambda n: Answer(500, {"Retry-After": "30"}) if n == 0 else Answer(200)
    )
    task_id = finish_task(tenant.tenant_id, receiver.url)

    wait_until(lambda: _delivered(task_id), 10, what="delivered well before 30 s")
    assert receiver.requests[1].at - receiver.requests[0].at < 10


def test_duplicate_deliver_messages_send_the_delivery_once(
    tenant, flask_app, celery_worker, make_receiver
):
    # The first send is held open while four more messages for the same delivery arrive
    # at the worker's other threads: the claim (SKIP LOCKED + lease) lets one through.
    receiver = make_receiver(lambda n: Answer(200, delay=1.0))
    task_id = finish_task(tenant.tenant_id, receiver.url)
    delivery_id = deliveries(task_id)[0]["id"]
    celery_app = flask_app.extensions["celery"]
    for _ in range(4):
        celery_app.send_task("outlast.deliver_webhook", args=[delivery_id], queue="webhooks")

    wait_until(lambda: _delivered(task_id), 20, what="delivered")
    time.sleep(1.0)
    assert receiver.count() == 1
    assert deliveries(task_id)[0]["attempts"] == 1
    assert len(attempts(delivery_id)) == 1


def test_submitted_task_posts_task_completed_when_the_echo_agent_finishes(
    client, auth, tenant, celery_worker, make_receiver
):
    receiver = make_receiver()
    response = client.post(
        "/v1/tasks",
        json={"agent": "echo", "input": {"message": "hi", "steps": 2}, "webhook_url": receiver.url},
        headers=auth,
    )
    assert response.status_code == 202, response.get_json()
    task_id = response.get_json()["id"]

    wait_until(lambda: _delivered(task_id), 30, what="task.completed delivered")
    (request,) = receiver.requests
    event = verify_with_reference(tenant.webhook_secret, request)
    assert event["type"] == "task.completed" and event["task_id"] == task_id
    assert event["data"]["task"]["result"] == {"message": "hi", "steps": 2}
    # The webhook is the same event the events endpoint serves.
    events = client.get(f"/v1/tasks/{task_id}/events", headers=auth).get_json()["data"]
    assert events[-1] == event


def test_task_waiting_for_input_posts_input_required_then_completed(
    client, auth, tenant, celery_worker, make_receiver
):
    receiver = make_receiver()
    task_id = client.post(
        "/v1/tasks",
        json={"agent": "approval", "input": {"question": "ship?"}, "webhook_url": receiver.url},
        headers=auth,
    ).get_json()["id"]
    wait_until(lambda: _delivered(task_id), 30, what="task.input_required delivered")
    asked = verify_with_reference(tenant.webhook_secret, receiver.requests[0])
    assert asked["type"] == "task.input_required"
    assert asked["data"]["task"]["input_request"]["prompt"] == "ship?"

    answer = client.post(
        f"/v1/tasks/{task_id}/input", json={"input": {"approved": True}}, headers=auth
    )
    assert answer.status_code == 202, answer.get_json()
    wait_until(lambda: _delivered(task_id, 2), 30, what="task.completed delivered")
    done = verify_with_reference(tenant.webhook_secret, receiver.requests[1])
    assert done["type"] == "task.completed"
    assert done["data"]["task"]["result"]["approved"] is True
    assert done["seq"] > asked["seq"]
