"""GET /v1/tasks/{id} (Retry-After, ETag/304, ?wait long poll), GET /v1/tasks (filters,
cursor paging), GET /v1/tasks/{id}/steps."""

from __future__ import annotations

import threading
import time

from app.api.longpoll import notifications
from app.store import db, lifecycle
from tests.api.conftest import (
    ask_for_input,
    assert_problem,
    checkpoint,
    complete,
    fail,
    start,
    submit,
)


def cancel_later(task_id: str, tenant_id: str, delay: float) -> threading.Timer:
    def cancel() -> None:
        with db.transaction() as conn:
            lifecycle.cancel(conn, task_id, tenant_id)

    timer = threading.Timer(delay, cancel)
    timer.start()
    return timer


# --- one task -----------------------------------------------------------------------------


def test_task_is_200_with_retry_after_while_not_terminal(client, auth):
    task = submit(client, auth)
    response = client.get(f"/v1/tasks/{task['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json() == task
    assert int(response.headers["Retry-After"]) >= 1
    start(task["id"])
    assert int(client.get(f"/v1/tasks/{task['id']}", headers=auth).headers["Retry-After"]) >= 1
    complete_task = submit(client, auth)
    ask_for_input(complete_task["id"])
    waiting = client.get(f"/v1/tasks/{complete_task['id']}", headers=auth)
    assert waiting.get_json()["status"] == "input_required"
    assert int(waiting.headers["Retry-After"]) >= 1


def test_terminal_task_has_no_retry_after(client, auth):
    done, failed, cancelled = submit(client, auth), submit(client, auth), submit(client, auth)
    complete(done["id"], {"answer": 42})
    fail(failed["id"])
    client.post(f"/v1/tasks/{cancelled['id']}/cancel", headers=auth)
    for task, status in [(done, "completed"), (failed, "failed"), (cancelled, "cancelled")]:
        response = client.get(f"/v1/tasks/{task['id']}", headers=auth)
        assert response.get_json()["status"] == status
        assert "Retry-After" not in response.headers
    body = client.get(f"/v1/tasks/{done['id']}", headers=auth).get_json()
    assert body["result"] == {"answer": 42} and body["finished_at"]
    assert client.get(f"/v1/tasks/{failed['id']}", headers=auth).get_json()["error"] == {
        "type": "agent_error",
        "message": "boom",
    }


def test_unknown_task_is_404(client, auth):
    for task_id in ["tsk_nope", "x" * 65, "tsk_%00", "..", "tsk_a b"]:
        assert_problem(client.get(f"/v1/tasks/{task_id}", headers=auth), 404, "not_found")


def test_if_none_match_with_the_current_etag_is_304_until_the_task_changes(client, auth):
    task = submit(client, auth)
    first = client.get(f"/v1/tasks/{task['id']}", headers=auth)
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    same = client.get(f"/v1/tasks/{task['id']}", headers={**auth, "If-None-Match": etag})
    assert same.status_code == 304 and same.get_data() == b""
    assert same.headers["ETag"] == etag
    listed = client.get(
        f"/v1/tasks/{task['id']}", headers={**auth, "If-None-Match": f'"other", W/{etag}'}
    )
    assert listed.status_code == 304
    start(task["id"])
    changed = client.get(f"/v1/tasks/{task['id']}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert changed.get_json()["status"] == "working"


def test_wait_on_a_terminal_task_answers_at_once(client, auth):
    task = submit(client, auth)
    client.post(f"/v1/tasks/{task['id']}/cancel", headers=auth)
    began = time.monotonic()
    response = client.get(f"/v1/tasks/{task['id']}?wait=30", headers=auth)
    assert response.status_code == 200 and time.monotonic() - began < 1


def test_wait_answers_after_n_seconds_when_nothing_changes(client, auth):
    task = submit(client, auth)
    began = time.monotonic()
    response = client.get(f"/v1/tasks/{task['id']}?wait=1", headers=auth)
    elapsed = time.monotonic() - began
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    assert 0.9 <= elapsed < 3


def test_wait_answers_as_soon_as_the_status_changes(client, auth, tenant):
    task = submit(client, auth)
    timer = cancel_later(task["id"], tenant.tenant_id, 0.5)
    began = time.monotonic()
    response = client.get(f"/v1/tasks/{task['id']}?wait=20", headers=auth)
    elapsed = time.monotonic() - began
    timer.join()
    assert response.get_json()["status"] == "cancelled"
    # Woken by NOTIFY, not by the 1 s re-read the waiters fall back to without LISTEN.
    assert 0.4 <= elapsed < 0.95, elapsed
    assert notifications.connected


def test_wait_answers_when_the_step_changes_but_not_on_progress_alone(client, auth):
    task = submit(client, auth)
    token = start(task["id"])

    def progress_then_checkpoint() -> None:
        with db.transaction() as conn:
            lifecycle.report_progress(conn, task["id"], token, {"current": 1, "total": 2})
        time.sleep(0.8)
        checkpoint(task["id"], 0, token)

    thread = threading.Thread(target=progress_then_checkpoint)
    began = time.monotonic()
    thread.start()
    response = client.get(f"/v1/tasks/{task['id']}?wait=20", headers=auth)
    elapsed = time.monotonic() - began
    thread.join()
    assert response.get_json()["step"] == 1
    assert response.get_json()["progress"] == {"current": 1, "total": 2}
    assert 0.7 <= elapsed < 4, elapsed


def test_wait_with_an_outdated_etag_answers_at_once(client, auth):
    task = submit(client, auth)
    old = client.get(f"/v1/tasks/{task['id']}", headers=auth).headers["ETag"]
    start(task["id"])
    began = time.monotonic()
    response = client.get(f"/v1/tasks/{task['id']}?wait=10", headers={**auth, "If-None-Match": old})
    assert response.status_code == 200 and time.monotonic() - began < 1


def test_wait_with_the_current_etag_and_no_change_is_304(client, auth):
    task = submit(client, auth)
    etag = client.get(f"/v1/tasks/{task['id']}", headers=auth).headers["ETag"]
    response = client.get(f"/v1/tasks/{task['id']}?wait=1", headers={**auth, "If-None-Match": etag})
    assert response.status_code == 304


def test_wait_out_of_range_or_wrong_type_is_422(client, auth):
    for wait in ["31", "-1", "abc", "nan", "inf"]:
        task = submit(client, auth)
        problem = assert_problem(
            client.get(f"/v1/tasks/{task['id']}?wait={wait}", headers=auth), 422, "validation_error"
        )
        assert "wait" in problem["errors"]


def test_long_poll_over_gunicorn_wakes_on_change_and_holds_no_pooled_connection(stack, tenant):
    import requests
    import sqlalchemy as sa

    stack.start("web", {"WEB_CONCURRENCY": "1", "OUTLAST_WEB_THREADS": "8"})
    stack.wait_ready()
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    url = stack.base_url + "/v1/tasks"
    task = requests.post(
        url, json={"agent": "echo", "input": {"message": "x"}}, headers=auth
    ).json()
    results: list = []

    def poll() -> None:
        began = time.monotonic()
        response = requests.get(f"{url}/{task['id']}?wait=20", headers=auth, timeout=30)
        results.append((response.json()["status"], time.monotonic() - began))

    pollers = [threading.Thread(target=poll) for _ in range(5)]
    for thread in pollers:
        thread.start()
    time.sleep(1.5)
    with db.engine().connect() as conn:
        busy = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'outlast' AND pid <> pg_backend_pid() "
                "AND state <> 'idle'"
            )
        ).scalar_one()
    assert busy == 0, "a waiting request holds a database connection in a transaction"
    requests.post(f"{url}/{task['id']}/cancel", headers=auth)
    for thread in pollers:
        thread.join()
    assert [status for status, _ in results] == ["cancelled"] * 5
    assert all(1.4 < elapsed < 5 for _, elapsed in results), results


# --- the list -----------------------------------------------------------------------------


def test_list_is_newest_first_with_default_limit_20(client, auth):
    ids = [submit(client, auth)["id"] for _ in range(22)]
    page = client.get("/v1/tasks", headers=auth).get_json()
    assert [t["id"] for t in page["data"]] == list(reversed(ids))[:20]
    assert isinstance(page["next_cursor"], str)
    rest = client.get(f"/v1/tasks?cursor={page['next_cursor']}", headers=auth).get_json()
    assert [t["id"] for t in rest["data"]] == list(reversed(ids))[20:]
    assert rest["next_cursor"] is None


def test_list_filters_by_status_and_agent(client, auth):
    pending = submit(client, auth)
    cancelled = submit(client, auth)
    client.post(f"/v1/tasks/{cancelled['id']}/cancel", headers=auth)
    approval = submit(client, auth, agent="approval", input={"question": "ok?"})

    def ids(query: str) -> list[str]:
        return [t["id"] for t in client.get(f"/v1/tasks?{query}", headers=auth).get_json()["data"]]

    assert ids("status=cancelled") == [cancelled["id"]]
    assert ids("status=pending") == [approval["id"], pending["id"]]
    assert ids("agent=approval") == [approval["id"]]
    assert ids("agent=echo&status=pending") == [pending["id"]]
    assert ids("agent=nobody") == []


def test_list_query_out_of_range_or_wrong_type_is_422(client, auth):
    for query in [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=1.5",
        "status=done",
        "cursor=not-a-cursor",
        "cursor=eyJ4IjogMX0",
        "agent=",
    ]:
        problem = assert_problem(
            client.get(f"/v1/tasks?{query}", headers=auth), 422, "validation_error"
        )
        assert query.split("=")[0] in problem["errors"], problem["errors"]


def test_limit_bounds_are_inclusive(client, auth):
    for _ in range(3):
        submit(client, auth)
    one = client.get("/v1/tasks?limit=1", headers=auth).get_json()
    assert len(one["data"]) == 1 and one["next_cursor"]
    assert len(client.get("/v1/tasks?limit=100", headers=auth).get_json()["data"]) == 3


def test_cursor_paging_has_no_duplicate_or_gap_while_tasks_are_added(client, auth, flask_app):
    before = [submit(client, auth)["id"] for _ in range(25)]
    stop = threading.Event()
    added: list[str] = []

    def keep_adding() -> None:
        writer = flask_app.test_client()
        while not stop.is_set():
            added.append(submit(writer, auth)["id"])
            time.sleep(0.01)

    thread = threading.Thread(target=keep_adding)
    thread.start()
    seen: list[str] = []
    cursor = None
    try:
        while True:
            query = "limit=4" + (f"&cursor={cursor}" if cursor else "")
            page = client.get(f"/v1/tasks?{query}", headers=auth).get_json()
            seen.extend(t["id"] for t in page["data"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    assert added, "no task was added while paging"
    assert len(seen) == len(set(seen)), "a task appeared twice"
    # Every task that existed when paging began is seen exactly once, newest first,
    # and a task added while paging never shows up behind the cursor.
    older = [task_id for task_id in seen if task_id in before]
    assert older == list(reversed(before))
    assert not set(added) & set(seen[4:])


# --- steps ----------------------------------------------------------------------------------


def test_steps_are_the_checkpoint_log_oldest_first_with_tool_calls(client, auth):
    task = submit(client, auth)
    assert client.get(f"/v1/tasks/{task['id']}/steps", headers=auth).get_json() == {"data": []}
    token = start(task["id"])
    token = checkpoint(task["id"], 0, token, calls=2)
    checkpoint(task["id"], 1, token, calls=0)
    steps = client.get(f"/v1/tasks/{task['id']}/steps", headers=auth).get_json()["data"]
    assert [s["index"] for s in steps] == [0, 1]
    assert all(s["status"] == "completed" for s in steps)
    assert steps[0]["started_at"] <= steps[0]["finished_at"] <= steps[1]["finished_at"]
    assert [c["index"] for c in steps[0]["tool_calls"]] == [0, 1]
    call = steps[0]["tool_calls"][0]
    assert call == {
        "index": 0,
        "name": "http_get",
        "idempotency_key": f"key-{task['id']}-0-0",
        "status": "completed",
        "kind": "call",  # V2.md 5: an undo is "compensation"
    }
    assert steps[1]["tool_calls"] == []


def test_steps_of_an_unknown_task_is_404(client, auth):
    assert_problem(client.get("/v1/tasks/tsk_nope/steps", headers=auth), 404, "not_found")
