"""GET /v1/agents (V2.md section 7): the versions this web process registers, those
live workers advertise and those this tenant has tasks in flight on."""

from __future__ import annotations

from app.store import db, fleet, lifecycle


def _task(tenant_id: str, agent: str, version: str) -> str:
    with db.transaction() as conn:
        row = lifecycle.create(
            conn,
            tenant_id=tenant_id,
            agent=agent,
            input={},
            metadata={},
            webhook_url=None,
            timeout_seconds=None,
            idempotency_key=None,
            agent_version=version,
        )
    return row["id"]


def _versions(client, auth, name: str) -> list[dict]:
    response = client.get("/v1/agents", headers=auth)
    assert response.status_code == 200, response.data
    return next(a for a in response.get_json()["data"] if a["name"] == name)["versions"]


def test_agents_lists_every_registered_version_with_its_input_schema(client, auth):
    response = client.get("/v1/agents", headers=auth)

    assert response.status_code == 200
    names = [a["name"] for a in response.get_json()["data"]]
    assert {"echo", "calls", "approval", "research", "sleepy"} <= set(names)
    assert names == sorted(names)
    echo = _versions(client, auth, "echo")
    assert [(v["version"], v["tasks_in_flight"], v["workers"]) for v in echo] == [("1", 0, 0)]
    assert echo[0]["input_schema"]["properties"]["message"]["type"] == "string"


def test_agents_counts_this_tenants_tasks_in_flight_and_live_workers_per_version(
    client, auth, tenant, other_tenant
):
    # Given: echo tasks on version 1 (one finished), one on a version this web lacks,
    # another tenant's task, and two live workers (one of them for echo 1 only) and a
    # dead one
    _task(tenant.tenant_id, "echo", "1")
    finished = _task(tenant.tenant_id, "echo", "1")
    _task(tenant.tenant_id, "echo", "0.9")
    _task(other_tenant.tenant_id, "echo", "1")
    _task(other_tenant.tenant_id, "ghost", "7")
    with db.transaction() as conn:
        lifecycle.cancel(conn, finished, tenant.tenant_id)
        fleet.beat(conn, "w1", [("echo", "1"), ("echo", "0.9")], 30)
        fleet.beat(conn, "w2", [("echo", "1")], 30)
        fleet.beat(conn, "dead", [("echo", "1"), ("echo", "0.9")], -1)

    # Then each version shows its own counts; the version only in flight has no schema
    assert _versions(client, auth, "echo") == [
        {"version": "0.9", "input_schema": None, "tasks_in_flight": 1, "workers": 1},
        {
            "version": "1",
            "input_schema": _versions(client, auth, "echo")[1]["input_schema"],
            "tasks_in_flight": 1,
            "workers": 2,
        },
    ]
    # And another tenant's tasks neither count nor list a version
    data = client.get("/v1/agents", headers=auth).get_json()["data"]
    assert "ghost" not in [a["name"] for a in data]


def test_a_worker_that_stops_is_no_longer_counted(client, auth):
    with db.transaction() as conn:
        fleet.beat(conn, "w1", [("echo", "1")], 30)
    assert _versions(client, auth, "echo")[0]["workers"] == 1
    with db.transaction() as conn:
        fleet.forget(conn, "w1")
    assert _versions(client, auth, "echo")[0]["workers"] == 0


def test_agents_needs_an_api_key(client):
    response = client.get("/v1/agents")
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/problem+json")
