"""Idempotency-Key on POST /v1/tasks: replay, reuse, in flight, scope, expiry, races."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import sqlalchemy as sa

from app.store import db, lifecycle, submission
from tests.api.conftest import assert_problem, submit

BODY = {"agent": "echo", "input": {"message": "once"}, "metadata": {"n": 1}}


def post(client, auth, key, body=BODY):
    return client.post("/v1/tasks", json=body, headers={**auth, "Idempotency-Key": key})


def count_tasks() -> int:
    with db.engine().connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one()


def test_same_key_and_body_replays_the_first_task_with_its_current_state(client, auth):
    first = post(client, auth, "order-1")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    task_id = first.get_json()["id"]
    client.post(f"/v1/tasks/{task_id}/cancel", headers=auth)

    again = post(client, auth, "order-1")
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == f"/v1/tasks/{task_id}"
    assert again.get_json()["id"] == task_id
    assert again.get_json()["status"] == "cancelled"  # current, not the first answer's
    assert count_tasks() == 1


def test_body_is_compared_as_parsed_json(client, auth):
    first = client.post(
        "/v1/tasks",
        data='{"agent":"echo","input":{"message":"once"},"metadata":{"n":1}}',
        headers={**auth, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    reordered = client.post(
        "/v1/tasks",
        data='{ "metadata": {"n": 1.0},\n "input": {"message": "once"}, "agent": "echo" }',
        headers={**auth, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    assert reordered.status_code == 202
    assert reordered.headers["Idempotent-Replayed"] == "true"
    assert reordered.get_json()["id"] == first.get_json()["id"]


def test_same_key_with_a_different_body_is_422_and_creates_nothing(client, auth):
    post(client, auth, "order-2")
    changed = post(client, auth, "order-2", {**BODY, "metadata": {"n": 2}})
    problem = assert_problem(changed, 422, "idempotency_key_reused")
    assert list(problem["errors"]) == ["Idempotency-Key"]
    assert count_tasks() == 1


def test_keys_are_scoped_to_the_tenant(client, auth, other_auth):
    mine = post(client, auth, "shared-key")
    theirs = post(client, other_auth, "shared-key")
    assert theirs.status_code == 202 and "Idempotent-Replayed" not in theirs.headers
    assert theirs.get_json()["id"] != mine.get_json()["id"]


def test_empty_long_or_non_printable_key_is_400(client, auth):
    for key in ["", "x" * 256, "caf\u00e9", "tab\there"]:
        response = client.post(
            "/v1/tasks",
            json=BODY,
            headers={**auth, "Idempotency-Key": key.encode("utf-8").decode("latin-1")},
        )
        assert_problem(response, 400, "invalid_idempotency_key")
        assert count_tasks() == 0


def test_key_of_255_printable_characters_is_accepted(client, auth):
    key = ("a-Z 0~!" * 40)[:255]
    assert post(client, auth, key).status_code == 202
    assert post(client, auth, key).headers["Idempotent-Replayed"] == "true"


def test_expired_key_not_yet_swept_creates_a_new_task(client, auth):
    first = post(client, auth, "old").get_json()
    with db.transaction() as conn:  # past its TTL; the expiry sweep has not run yet
        conn.execute(
            sa.text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        )
    second = post(client, auth, "old")
    assert second.status_code == 202 and "Idempotent-Replayed" not in second.headers
    assert second.get_json()["id"] != first["id"]
    # The key now belongs to the new task.
    assert post(client, auth, "old").get_json()["id"] == second.get_json()["id"]


def test_key_is_kept_for_the_configured_ttl(make_app, tenant):
    client = make_app(idempotency_ttl_seconds=1).test_client()
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    first = post(client, auth, "short").get_json()
    assert post(client, auth, "short").get_json()["id"] == first["id"]
    time.sleep(1.2)
    assert post(client, auth, "short").get_json()["id"] != first["id"]


def test_request_waiting_on_an_uncommitted_first_is_409_then_a_retry_replays(client, auth, tenant):
    # Given a first request whose transaction holds the key and has not committed...
    first_transaction = db.transaction()
    blocker = first_transaction.__enter__()
    blocker.execute(
        sa.text(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, expires_at) "
            "VALUES (:t, 'slow', :f, now() + interval '1 hour')"
        ),
        {"t": tenant.tenant_id, "f": submission.fingerprint(BODY)},
    )
    row = lifecycle.create(
        blocker,
        tenant_id=tenant.tenant_id,
        agent="echo",
        input=BODY["input"],
        metadata=BODY["metadata"],
        webhook_url=None,
        timeout_seconds=None,
        idempotency_key="slow",
    )
    blocker.execute(sa.text("UPDATE idempotency_keys SET task_id = :id"), {"id": row["id"]})
    try:
        # ...a second one waits a few seconds, then answers 409 in flight.
        began = time.monotonic()
        response = post(client, auth, "slow")
        waited = time.monotonic() - began
        problem = assert_problem(response, 409, "idempotency_key_in_flight")
        assert response.headers["Retry-After"]
        assert (
            submission.IN_FLIGHT_WAIT_SECONDS - 0.5 < waited < submission.IN_FLIGHT_WAIT_SECONDS + 3
        )
        assert problem["detail"]
    finally:
        first_transaction.__exit__(None, None, None)  # commits
    # Once the first committed, the retry gets its task.
    retry = post(client, auth, "slow")
    assert retry.status_code == 202 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.get_json()["id"] == row["id"]
    assert count_tasks() == 1


def test_waiting_request_replays_as_soon_as_the_first_commits(client, auth, tenant):
    first_transaction = db.transaction()
    blocker = first_transaction.__enter__()
    blocker.execute(
        sa.text(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, expires_at) "
            "VALUES (:t, 'k2', :f, now() + interval '1 hour')"
        ),
        {"t": tenant.tenant_id, "f": submission.fingerprint(BODY)},
    )
    row = lifecycle.create(
        blocker,
        tenant_id=tenant.tenant_id,
        agent="echo",
        input=BODY["input"],
        metadata=BODY["metadata"],
        webhook_url=None,
        timeout_seconds=None,
        idempotency_key="k2",
    )
    blocker.execute(sa.text("UPDATE idempotency_keys SET task_id = :id"), {"id": row["id"]})
    threading.Timer(0.5, lambda: first_transaction.__exit__(None, None, None)).start()
    response = post(client, auth, "k2")
    assert response.status_code == 202
    assert response.get_json()["id"] == row["id"]


def test_a_rolled_back_first_request_leaves_the_key_free(client, auth, tenant):
    blocker = db.engine().connect()
    tx = blocker.begin()
    blocker.execute(
        sa.text(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, expires_at) "
            "VALUES (:t, 'k3', 'other', now() + interval '1 hour')"
        ),
        {"t": tenant.tenant_id},
    )
    threading.Timer(0.5, lambda: (tx.rollback(), blocker.close())).start()
    response = post(client, auth, "k3")
    assert response.status_code == 202 and "Idempotent-Replayed" not in response.headers


def test_twenty_concurrent_submissions_with_one_key_create_exactly_one_task(stack, tenant):
    stack.start("web", {"WEB_CONCURRENCY": "2", "OUTLAST_WEB_THREADS": "12"})
    stack.wait_ready()
    headers = {"Authorization": f"Bearer {tenant.api_key}", "Idempotency-Key": "race"}
    barrier = threading.Barrier(20)

    def one(_: int) -> tuple[int, str | None, str | None]:
        barrier.wait()
        for _attempt in range(10):  # a 409 in flight is retried, as a client would
            response = requests.post(
                stack.base_url + "/v1/tasks", json=BODY, headers=headers, timeout=30
            )
            if response.status_code != 409:
                body = response.json()
                return (
                    response.status_code,
                    body.get("id"),
                    response.headers.get("Idempotent-Replayed"),
                )
            assert response.json()["code"] == "idempotency_key_in_flight"
            time.sleep(0.2)
        raise AssertionError("still in flight after 10 tries")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert {status for status, _, _ in results} == {202}, stack.logs()
    assert len({task_id for _, task_id, _ in results}) == 1
    assert sorted(replayed or "" for _, _, replayed in results) == [""] + ["true"] * 19
    assert count_tasks() == 1


def test_submission_without_key_always_creates(client, auth):
    a = submit(client, auth)
    b = submit(client, auth)
    assert a["id"] != b["id"]
