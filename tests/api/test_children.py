"""``GET /v1/tasks/{id}/children``, ``parent_id``, the fanout's submission checks, and
cancel cascading to children, through the HTTP API (children spawned "by hand" with the
engine's spawn, as a step would, so no worker runs here)."""

from __future__ import annotations

from app.engine import children as engine_children
from app.store import db, lifecycle
from tests.api.conftest import PROBLEM_JSON, start, submit

# A parent to spawn from by hand (no worker runs its own step here).
FANOUT = {"agent": "echo", "inputs": [{"message": "m"}]}


def spawn_children(parent_id: str, n: int, **child_input) -> list[str]:
    """Lease the parent's step 0 and spawn ``n`` echo children from it."""
    token = start(parent_id)
    return [
        engine_children.spawn(
            parent_id=parent_id,
            step=0,
            index=i,
            token=token,
            agent_name="echo",
            input={"message": f"child {i}", **child_input},
            metadata={"i": i},
        )
        for i in range(n)
    ]


def test_children_are_listed_in_spawn_order_with_cursor_paging(client, auth):
    # Given a parent with five children
    parent = submit(client, auth, agent="fanout", input=FANOUT)
    ids = spawn_children(parent["id"], 5)

    # When the children are listed two at a time
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = client.get(
            f"/v1/tasks/{parent['id']}/children", query_string=query, headers=auth
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        page = response.get_json()
        seen.extend(page["data"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    # Then every child comes once, in the order spawned, each a task with parent_id
    assert pages == 3
    assert [t["id"] for t in seen] == ids
    assert {t["object"] for t in seen} == {"task"}
    assert {t["parent_id"] for t in seen} == {parent["id"]}
    assert [t["metadata"] for t in seen] == [{"i": i} for i in range(5)]
    assert [t["input"]["message"] for t in seen] == [f"child {i}" for i in range(5)]
    # And a task's own representation says who its parent is
    child = client.get(f"/v1/tasks/{ids[0]}", headers=auth).get_json()
    assert child["parent_id"] == parent["id"]
    assert client.get(f"/v1/tasks/{parent['id']}", headers=auth).get_json()["parent_id"] is None
    # A task without children has an empty list
    empty = client.get(f"/v1/tasks/{ids[0]}/children", headers=auth).get_json()
    assert empty == {"data": [], "next_cursor": None}


def test_another_tenants_children_and_an_unknown_task_are_404(client, auth, other_auth):
    parent = submit(client, auth, agent="fanout", input=FANOUT)
    spawn_children(parent["id"], 1)
    for headers, task_id in ((other_auth, parent["id"]), (auth, "tsk_nope"), (auth, "x" * 65)):
        response = client.get(f"/v1/tasks/{task_id}/children", headers=headers)
        assert response.status_code == 404
        assert response.mimetype == PROBLEM_JSON
        assert response.get_json()["code"] == "not_found"


def test_children_query_out_of_range_is_422(client, auth):
    parent = submit(client, auth)
    for query in ({"limit": 0}, {"limit": 101}, {"cursor": "!!"}, {"limt": 2}):
        response = client.get(
            f"/v1/tasks/{parent['id']}/children", query_string=query, headers=auth
        )
        assert response.status_code == 422, query
        assert response.get_json()["code"] == "validation_error"
        assert response.get_json()["errors"]


def test_fanout_refuses_a_child_input_the_child_agent_refuses_with_422(client, auth):
    inputs = [{"message": "fine"}, {"message": 7}, {"steps": 2}]
    response = client.post(
        "/v1/tasks",
        json={"agent": "fanout", "input": {"agent": "echo", "inputs": inputs}},
        headers=auth,
    )
    assert response.status_code == 422
    assert response.mimetype == PROBLEM_JSON
    errors = response.get_json()["errors"]
    assert set(errors) == {"input.inputs.1.message", "input.inputs.2.message"}
    # an unknown child agent, no inputs, too many inputs, a bad mode
    for bad, field in (
        ({"agent": "nope", "inputs": [{}]}, "input.agent"),
        ({"agent": "echo", "inputs": []}, "input.inputs"),
        ({"agent": "echo", "inputs": [{"message": "m"}] * 101}, "input.inputs"),
        ({"agent": "echo", "inputs": [{"message": "m"}], "mode": "some"}, "input.mode"),
    ):
        response = client.post("/v1/tasks", json={"agent": "fanout", "input": bad}, headers=auth)
        assert response.status_code == 422, bad
        assert field in response.get_json()["errors"], response.get_json()
    # Nothing was created
    assert client.get("/v1/tasks", headers=auth).get_json()["data"] == []


def test_cancelling_a_parent_through_the_api_cancels_its_running_children(client, auth):
    # Given a parent with three children, one already finished
    parent = submit(client, auth, agent="fanout", input=FANOUT)
    ids = spawn_children(parent["id"], 3)
    start(ids[0])
    with db.transaction() as conn:
        assert lifecycle.complete(conn, ids[0], {"message": "child 0", "steps": 1})
    start(ids[1])  # working

    # When the parent is cancelled
    response = client.post(f"/v1/tasks/{parent['id']}/cancel", headers=auth)

    # Then it is cancelled, and so are its non-terminal children, by the time the answer
    # comes; the finished one keeps its result
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    kids = client.get(f"/v1/tasks/{parent['id']}/children", headers=auth).get_json()["data"]
    assert [k["status"] for k in kids] == ["completed", "cancelled", "cancelled"]
    assert kids[0]["result"] == {"message": "child 0", "steps": 1}


def test_deleting_a_finished_parent_keeps_its_children_without_a_parent(client, auth):
    parent = submit(client, auth, agent="fanout", input=FANOUT)
    ids = spawn_children(parent["id"], 2)
    assert client.post(f"/v1/tasks/{parent['id']}/cancel", headers=auth).status_code == 200

    response = client.delete(f"/v1/tasks/{parent['id']}", headers=auth)

    assert response.status_code == 204
    for child_id in ids:
        child = client.get(f"/v1/tasks/{child_id}", headers=auth).get_json()
        assert child["status"] == "cancelled" and child["parent_id"] is None
