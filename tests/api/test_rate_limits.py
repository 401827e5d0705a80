"""Rate limit per API key (V2.md 8): OUTLAST_RATE_LIMIT_PER_SECOND with a burst of twice
that, counted in Redis, 429 rate_limited with Retry-After, and the IETF
RateLimit-Policy / RateLimit fields on every /v1 answer. (Shared across web processes:
tests/api/test_waiters.py, against two gunicorn processes.)"""

from __future__ import annotations

import re
import time

from tests.api.conftest import assert_problem

RATE_LIMIT = re.compile(r'^"per-key";r=(\d+);t=(\d+)$')


def test_every_v1_answer_carries_the_policy_and_what_is_left(make_app, auth):
    client = make_app(rate_limit_per_second=100).test_client()
    answers = [
        client.get("/v1/tasks", headers=auth),
        client.get("/v1/tasks/tsk_missing", headers=auth),
        client.post("/v1/tasks", json={"agent": "nope"}, headers=auth),
    ]
    remaining = []
    for response in answers:
        assert response.headers["RateLimit-Policy"] == '"per-key";q=200;w=2'
        match = RATE_LIMIT.match(response.headers["RateLimit"])
        assert match, response.headers["RateLimit"]
        remaining.append(int(match.group(1)))
        assert int(match.group(2)) <= 2
    assert remaining == [199, 198, 197]
    # An answer without a (valid) key still names the policy; it counts against no key
    unauthenticated = client.get("/v1/tasks")
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["RateLimit-Policy"] == '"per-key";q=200;w=2'
    assert "RateLimit" not in unauthenticated.headers
    # Operational paths are not /v1: no rate-limit fields
    assert "RateLimit-Policy" not in client.get("/healthz").headers


def test_burst_over_the_limit_gets_429_with_headers_and_another_key_is_unaffected(
    make_app, auth, other_auth
):
    # Given 5 requests per second, a burst of 10
    client = make_app(rate_limit_per_second=5).test_client()
    # When one key sends 14 requests at once
    statuses = [client.get("/v1/tasks", headers=auth).status_code for _ in range(10)]
    refused = client.get("/v1/tasks", headers=auth)
    # Then the burst of 10 is served and the next is a 429 problem with Retry-After
    assert statuses == [200] * 10
    body = assert_problem(refused, 429, "rate_limited")
    assert "5 requests per second" in body["detail"]
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    assert refused.headers["RateLimit-Policy"] == '"per-key";q=10;w=2'
    assert RATE_LIMIT.match(refused.headers["RateLimit"]).group(1) == "0"
    # A refused request does no work: a submission is not created
    before = client.get("/v1/tasks", headers=other_auth)
    assert before.status_code == 200
    refused_submit = client.post("/v1/tasks", json={"agent": "echo", "input": {}}, headers=auth)
    assert refused_submit.status_code == 429
    # And another key is unaffected
    assert RATE_LIMIT.match(before.headers["RateLimit"]).group(1) == "9"
    # And after Retry-After the first key is served again
    time.sleep(retry_after + 0.1)
    assert client.get("/v1/tasks", headers=auth).status_code == 200


def test_rate_limit_zero_is_off(make_app, auth):
    client = make_app(rate_limit_per_second=0).test_client()
    for _ in range(30):
        response = client.get("/v1/tasks", headers=auth)
        assert response.status_code == 200
    assert "RateLimit-Policy" not in response.headers and "RateLimit" not in response.headers


def test_redis_unreachable_lets_requests_through(make_app, auth, settings):
    # Given a web whose Redis is gone (the rate limit cannot be counted)
    client = make_app(rate_limit_per_second=1, redis_url="redis://127.0.0.1:1/0").test_client()
    # Then requests are served rather than refused, promptly, without a RateLimit field
    t0 = time.monotonic()
    for _ in range(5):
        response = client.get("/v1/tasks", headers=auth)
        assert response.status_code == 200
        assert "RateLimit" not in response.headers
    assert time.monotonic() - t0 < 5
