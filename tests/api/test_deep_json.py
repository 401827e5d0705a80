"""No body makes a 500: every POST endpoint of /v1 (whatever its own parser) answers a
100,000-deep JSON document, and one just past the depth limit, with 400 or 422."""

from __future__ import annotations

import re

from tests.api.conftest import PROBLEM_JSON, submit

DEPTHS = (100_000, 1_000, 70)  # 70: just past MAX_DEPTH (64)


def deep_bodies(depth: int) -> list[bytes]:
    """A deep array, and a deep object under the field each endpoint reads."""
    return [
        b"[" * depth + b"]" * depth,
        b'{"input": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}",
        b'{"after": ' + b"[" * depth + b"]" * depth + b"}",
    ]


def post_paths(flask_app, task_id: str) -> list[str]:
    """Every /v1 rule that takes POST, with a real task's id."""
    paths = []
    for rule in flask_app.url_map.iter_rules():
        if rule.rule.startswith("/v1/") and "POST" in rule.methods:
            paths.append(re.sub(r"<(?:[^:<>]+:)?[^<>]+>", task_id, rule.rule))
    return sorted(paths)


def test_deep_json_on_every_post_endpoint_is_a_400_or_422_never_a_500(client, flask_app, auth):
    # Given a real task, so that no endpoint stops at a 404 before reading the body
    task_id = submit(client, auth)["id"]
    paths = post_paths(flask_app, task_id)
    assert {"/v1/tasks", f"/v1/tasks/{task_id}/deliveries/replay"} <= set(paths), paths
    for path in paths:
        for depth in DEPTHS:
            for body in deep_bodies(depth):
                # When the deep body is posted
                response = client.post(
                    path, data=body, headers={**auth, "Content-Type": "application/json"}
                )
                # Then it is refused as a problem: 400 (not parseable) or 422 (too deep)
                assert response.status_code in (400, 422), (path, depth, response.status_code)
                assert response.mimetype == PROBLEM_JSON
                assert response.get_json()["code"] in ("invalid_json", "validation_error")


def test_replay_body_is_checked_like_every_other_body(client, auth):
    task_id = submit(client, auth)["id"]
    path = f"/v1/tasks/{task_id}/deliveries/replay"
    cases = [
        (b"{nope", "application/json", 400, "invalid_json"),
        (b'{"after": NaN}', "application/json", 400, "invalid_json"),
        (b'{"after": 1}', "text/plain", 415, "unsupported_media_type"),
        (b'{"after": "\\u0000"}', "application/json", 422, "validation_error"),
        (b'{"after": -1}', "application/json", 422, "validation_error"),
    ]
    for body, content_type, status, code in cases:
        response = client.post(path, data=body, headers={**auth, "Content-Type": content_type})
        assert response.status_code == status, (body, response.get_data(as_text=True))
        assert response.get_json()["code"] == code
    # An absent (or blank) body is no body at all: replay everything
    for body in (b"", b"  \n"):
        response = client.post(path, data=body, headers=auth)
        assert response.status_code == 202, response.get_data(as_text=True)


def test_echo_message_is_at_most_65536_characters(client, auth):
    submit(client, auth, input={"message": "m" * 65_536})
    response = client.post(
        "/v1/tasks", json={"agent": "echo", "input": {"message": "m" * 65_537}}, headers=auth
    )
    assert response.status_code == 422
    assert "input.message" in response.get_json()["errors"]
