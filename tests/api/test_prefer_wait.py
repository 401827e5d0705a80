"""``Prefer: wait=N`` on POST /v1/tasks (V2.md section 3): a synchronous answer when the
task settles within N seconds, the usual 202 after N seconds otherwise."""

from __future__ import annotations

import time

import pytest

from app.api import prefer
from tests.api.conftest import assert_problem

ECHO = {"agent": "echo", "input": {"message": "hi"}}


def post(client, auth, body, prefer_header: str | None = None, key: str | None = None):
    headers = dict(auth)
    if prefer_header is not None:
        headers["Prefer"] = prefer_header
    if key is not None:
        headers["Idempotency-Key"] = key
    started = time.monotonic()
    response = client.post("/v1/tasks", json=body, headers=headers)
    return response, time.monotonic() - started


def test_a_one_step_echo_with_prefer_wait_answers_200_completed(client, auth, celery_worker):
    response, _ = post(client, auth, ECHO, "wait=10")

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Preference-Applied"] == "wait=10"
    task = response.get_json()
    assert task["status"] == "completed"
    assert task["result"] == {"message": "hi", "steps": 1}
    assert response.headers["Location"] == f"/v1/tasks/{task['id']}"
    assert "Retry-After" not in response.headers
    read = client.get(f"/v1/tasks/{task['id']}", headers=auth)
    assert read.get_json() == task and read.headers["ETag"] == response.headers["ETag"]


def test_a_slow_task_answers_202_after_about_n_seconds(client, auth, celery_worker):
    slow = {"agent": "echo", "input": {"message": "slow", "step_seconds": 5}}

    response, took = post(client, auth, slow, "wait=2")

    assert response.status_code == 202
    assert response.headers["Preference-Applied"] == "wait=2"
    assert 1.9 <= took < 3.5, took
    task = response.get_json()
    assert task["status"] in ("pending", "working")
    assert response.headers["Retry-After"]
    client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth)  # frees the worker


def test_a_task_that_asks_for_input_answers_200_input_required(client, auth, celery_worker):
    body = {"agent": "approval", "input": {"question": "Ship it?"}}

    response, took = post(client, auth, body, "wait=15")

    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=15"
    task = response.get_json()
    assert task["status"] == "input_required"
    assert task["input_request"]["prompt"] == "Ship it?"
    assert took < 10


def test_an_idempotent_replay_honours_prefer_wait(client, auth, celery_worker):
    first, _ = post(client, auth, ECHO, key="replayed-wait")
    assert first.status_code == 202 and "Preference-Applied" not in first.headers

    replay, _ = post(client, auth, ECHO, "wait=10", key="replayed-wait")

    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Preference-Applied"] == "wait=10"
    assert replay.get_json()["id"] == first.get_json()["id"]
    assert replay.get_json()["status"] == "completed"


def test_a_replay_of_a_settled_task_answers_at_once(client, auth, celery_worker):
    done, _ = post(client, auth, ECHO, "wait=10", key="settled")
    assert done.status_code == 200

    replay, took = post(client, auth, ECHO, "wait=60", key="settled")

    assert replay.status_code == 200 and took < 1
    assert replay.headers["Preference-Applied"] == "wait=60"
    assert replay.get_json()["id"] == done.get_json()["id"]


@pytest.mark.parametrize(
    "header",
    [
        "wait=0",
        "wait=61",
        "wait=-1",
        "wait=2.5",
        "wait=abc",
        "wait",
        "respond-async",
        "",
        "wait=99999999999999999999",
    ],
)
def test_prefer_without_a_usable_wait_is_ignored(client, auth, header):
    # No worker runs: an honoured wait would hold the answer for its N seconds.
    response, took = post(client, auth, ECHO, header)

    assert response.status_code == 202, response.get_data(as_text=True)
    assert "Preference-Applied" not in response.headers
    assert response.get_json()["status"] == "pending"
    assert took < 1


def test_with_every_waiter_slot_taken_the_task_is_accepted_and_the_wait_ignored(
    make_app, auth, tenant
):
    from app.api import limits

    client = make_app(max_waiters_per_tenant=1).test_client()
    slot = limits.acquire_waiter(tenant.tenant_id)  # the tenant's only slot, held elsewhere
    try:
        response, took = post(client, auth, ECHO, "wait=10")
    finally:
        slot.release()

    assert response.status_code == 202, response.get_data(as_text=True)
    assert "Preference-Applied" not in response.headers
    assert response.get_json()["status"] == "pending" and took < 2
    assert client.get(response.headers["Location"], headers=auth).status_code == 200


def test_prefer_wait_does_not_change_how_a_bad_submission_is_refused(client, auth):
    response, took = post(client, auth, {"agent": "echo", "input": {}}, "wait=30")

    assert_problem(response, 422, "validation_error")
    assert "Preference-Applied" not in response.headers
    assert took < 1


def test_the_openapi_document_describes_prefer_and_preference_applied(client):
    submit = client.get("/openapi.json").get_json()["paths"]["/v1/tasks"]["post"]

    assert "Prefer" in {p["name"] for p in submit["parameters"] if p["in"] == "header"}
    for status in ("200", "202"):
        assert "Preference-Applied" in submit["responses"][status]["headers"]


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        (["wait=10"], 10),
        (["respond-async, wait=5"], 5),
        (["WAIT = 7"], 7),
        (['wait="12"'], 12),
        (["wait=4; foo=bar"], 4),
        (["wait=1", "wait=30"], 1),  # the first instance counts (RFC 7240 section 2)
        (["return=minimal", "wait=60"], 60),
        (["wait=0060"], 60),
        (["wait=0"], None),
        (["wait=61"], None),
        (["wait=١٠"], None),  # Arabic-Indic digits are not delta-seconds
        (["handling=lenient"], None),
        ([], None),
    ],
)
def test_the_prefer_header_is_read_as_rfc_7240_says(headers, seconds):
    assert prefer.wait_seconds(headers) == seconds
