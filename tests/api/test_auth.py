"""Bearer keys in the Authorization header only; one tenant never sees another's tasks."""

from __future__ import annotations

from tests.api.conftest import ask_for_input, assert_problem, submit

V1_READS = [
    "/v1/tasks",
    "/v1/tasks/tsk_x",
    "/v1/tasks/tsk_x/steps",
    "/v1/tasks/tsk_x/events",
]


def assert_unauthorized(response) -> None:
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_missing_key_is_401_with_bearer_challenge(client):
    for path in V1_READS:
        assert_unauthorized(client.get(path))


def test_submission_without_key_is_401_and_creates_nothing(client, auth):
    assert_unauthorized(client.post("/v1/tasks", json={"agent": "echo", "input": {"message": "x"}}))
    assert client.get("/v1/tasks", headers=auth).get_json()["data"] == []


def test_unknown_key_is_401(client):
    assert_unauthorized(client.get("/v1/tasks", headers={"Authorization": "Bearer olk_nope"}))


def test_another_scheme_or_malformed_header_is_401(client, tenant):
    for header in ["Basic {key}", "Token {key}", "{key}", "Bearer", "Bearer ", "bearer{key}"]:
        response = client.get(
            "/v1/tasks", headers={"Authorization": header.format(key=tenant.api_key)}
        )
        assert_unauthorized(response)


def test_bearer_scheme_is_case_insensitive(client, tenant):
    response = client.get("/v1/tasks", headers={"Authorization": f"bearer {tenant.api_key}"})
    assert response.status_code == 200


def test_key_in_query_string_is_401_even_with_a_valid_header(client, tenant, auth):
    for param in ["api_key", "access_token", "key", "whatever"]:
        alone = client.get(f"/v1/tasks?{param}={tenant.api_key}")
        assert_unauthorized(alone)
        with_header = client.get(f"/v1/tasks?{param}={tenant.api_key}", headers=auth)
        assert_unauthorized(with_header)


def test_key_in_cookie_is_401(client, tenant, auth):
    client.set_cookie("api_key", tenant.api_key)
    assert_unauthorized(client.get("/v1/tasks"))
    assert_unauthorized(client.get("/v1/tasks", headers=auth))


def test_ops_endpoints_need_no_key(client):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


def test_another_tenants_task_is_404_exactly_like_a_missing_one(client, auth, other_auth):
    theirs = submit(client, other_auth)
    ask_for_input(theirs["id"])
    base = f"/v1/tasks/{theirs['id']}"
    missing = "/v1/tasks/tsk_doesnotexist"
    for suffix, method, body in [
        ("", "get", None),
        ("/steps", "get", None),
        ("/events", "get", None),
        ("/cancel", "post", None),
        ("/input", "post", {"input": {"approved": True}}),
    ]:
        mine = getattr(client, method)(base + suffix, headers=auth, json=body)
        never = getattr(client, method)(missing + suffix, headers=auth, json=body)
        assert_problem(mine, 404, "not_found")
        assert_problem(never, 404, "not_found")
        assert mine.get_json() == never.get_json()
    # ...and the other tenant's task was not touched.
    assert client.get(base, headers=other_auth).get_json()["status"] == "input_required"


def test_listing_shows_only_the_tenants_own_tasks(client, auth, other_auth):
    mine = submit(client, auth)
    submit(client, other_auth)
    listed = client.get("/v1/tasks", headers=auth).get_json()["data"]
    assert [t["id"] for t in listed] == [mine["id"]]
