"""API keys' lifecycle (V2.md 12a): ``outlast tenants add-key --expires-in``, ``keys``,
``revoke-key``; a revoked or expired key is refused by every web process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from app.api.auth import KEY_CACHE_SECONDS
from app.store import db, ids, tenants
from tests.conftest import fresh_stack
from tests.harness import wait_until

OUTLAST = str(Path(sys.executable).with_name("outlast"))
KEY_FIELDS = {"prefix", "created_at", "last_used_at", "expires_at", "revoked_at"}
REVOCATION_BOUND_SECONDS = 5.0  # V2.md 12a


@pytest.fixture
def outlast(env):
    """Run the real ``outlast`` command on this test's database."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [OUTLAST, *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def key_lines(ran: subprocess.CompletedProcess[str]) -> list[dict]:
    assert ran.returncode == 0, ran.stderr
    return [json.loads(line) for line in ran.stdout.splitlines()]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the commands ---------------------------------------------------------------------------


def test_add_key_prints_the_key_once_with_its_prefix_and_expiry(outlast, tenant, client):
    before = datetime.now(UTC)
    ran = outlast("tenants", "add-key", tenant.name, "--expires-in", "90d")

    assert ran.returncode == 0, ran.stderr
    issued = json.loads(ran.stdout)
    assert set(issued) == {"tenant_id", "name", "api_key", "prefix", "expires_at"}
    assert (issued["tenant_id"], issued["name"]) == (tenant.tenant_id, tenant.name)
    assert issued["api_key"].startswith("olk_")
    assert issued["prefix"] == issued["api_key"][:12]
    expires_at = parse_time(issued["expires_at"])
    assert before + timedelta(days=90) - timedelta(seconds=1) <= expires_at
    assert expires_at <= datetime.now(UTC) + timedelta(days=90)
    assert client.get("/v1/tasks", headers=bearer(issued["api_key"])).status_code == 200

    forever = json.loads(outlast("tenants", "add-key", tenant.name).stdout)
    assert forever["expires_at"] is None and forever["prefix"] == forever["api_key"][:12]


@pytest.mark.parametrize("duration", ["90", "5w", "-1d", "0d", "1.5h", "d", "90 days", "99999999d"])
def test_add_key_refuses_a_malformed_duration_and_issues_nothing(outlast, tenant, duration):
    ran = outlast("tenants", "add-key", tenant.name, "--expires-in", duration)

    assert ran.returncode == 2, ran.stdout
    assert "Invalid value for '--expires-in'" in ran.stderr
    assert "olk_" not in ran.stdout + ran.stderr
    with db.engine().connect() as conn:
        count = conn.execute(
            sa.text("SELECT count(*) FROM api_keys WHERE tenant_id = :t"), {"t": tenant.tenant_id}
        ).scalar_one()
    assert count == 1  # only the key the tenant was created with


def test_add_key_for_an_unknown_tenant_fails_with_a_message(outlast, settings):
    ran = outlast("tenants", "add-key", "nobody", "--expires-in", "1h")
    assert ran.returncode == 1 and "no tenant named 'nobody'" in ran.stderr


def test_keys_lists_prefixes_and_dates_one_json_object_per_line(outlast, tenant, client, auth):
    extra = json.loads(outlast("tenants", "add-key", tenant.name, "--expires-in", "12h").stdout)
    assert client.get("/v1/tasks", headers=auth).status_code == 200  # the first key is used

    ran = outlast("tenants", "keys", tenant.name)

    lines = key_lines(ran)
    assert [set(line) for line in lines] == [KEY_FIELDS, KEY_FIELDS]
    first, second = lines
    assert first["prefix"] == tenant.api_key[:12] and second["prefix"] == extra["prefix"]
    assert first["last_used_at"] is not None and second["last_used_at"] is None
    assert first["expires_at"] is None and second["expires_at"] == extra["expires_at"]
    assert first["revoked_at"] is None and second["revoked_at"] is None
    assert parse_time(first["created_at"]) <= parse_time(second["created_at"])
    assert tenant.api_key not in ran.stdout and extra["api_key"] not in ran.stdout

    unknown = outlast("tenants", "keys", "nobody")
    assert unknown.returncode == 1 and "no tenant named" in unknown.stderr


def test_revoke_key_revokes_that_key_once_and_refuses_unknown_or_ambiguous_prefixes(
    outlast, tenant
):
    prefix = tenant.api_key[:12]

    revoked = outlast("tenants", "revoke-key", prefix)

    [line] = key_lines(revoked)
    assert set(line) == KEY_FIELDS and line["prefix"] == prefix and line["revoked_at"]
    with db.engine().connect() as conn:
        assert tenants.tenant_for_api_key(conn, tenant.api_key) is None
    # Revoking again changes nothing (the first revocation time stays).
    assert key_lines(outlast("tenants", "revoke-key", prefix)) == [line]
    assert key_lines(outlast("tenants", "keys", tenant.name)) == [line]

    unknown = outlast("tenants", "revoke-key", "olk_00000000")
    assert unknown.returncode == 1
    assert "no API key has the prefix 'olk_00000000'" in unknown.stderr

    # Two keys sharing a prefix (as old 10-character prefixes could): nothing is revoked.
    with db.transaction() as conn:
        for n in range(2):
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, tenant_id, key_hash, key_prefix) "
                    "VALUES (:id, :t, :h, 'olk_twin')"
                ),
                {"id": ids.new_id("key"), "t": tenant.tenant_id, "h": f"twin-{n}"},
            )
    ambiguous = outlast("tenants", "revoke-key", "olk_twin")
    assert ambiguous.returncode == 1 and "2 API keys have the prefix" in ambiguous.stderr
    with db.engine().connect() as conn:
        assert (
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM api_keys WHERE key_prefix = 'olk_twin' "
                    "AND revoked_at IS NULL"
                )
            ).scalar_one()
            == 2
        )


# --- what a key opens -------------------------------------------------------------------


def test_the_prefix_alone_or_a_truncated_key_does_not_authenticate(client, tenant, auth):
    assert client.get("/v1/tasks", headers=auth).status_code == 200
    for partial in (tenant.api_key[:12], tenant.api_key[:10], tenant.api_key[:-1]):
        response = client.get("/v1/tasks", headers=bearer(partial))
        assert response.status_code == 401, partial


def test_last_used_at_is_written_once_per_interval_not_once_per_request(client, tenant, auth):
    def last_used() -> datetime | None:
        with db.engine().connect() as conn:
            return conn.execute(
                sa.text("SELECT last_used_at FROM api_keys WHERE tenant_id = :t"),
                {"t": tenant.tenant_id},
            ).scalar_one()

    assert last_used() is None
    assert client.get("/v1/tasks", headers=auth).status_code == 200
    first = last_used()
    assert first is not None

    for _ in range(20):
        assert client.get("/v1/tasks", headers=auth).status_code == 200

    assert last_used() == first  # no write per request: at most one per minute per process


# --- every web process ------------------------------------------------------------------


@dataclass
class TwoWebs:
    """Two web processes (each with two gunicorn workers, each worker its own key cache)
    on one database with one tenant, and the ``outlast`` command on that database."""

    urls: list[str]
    tenant: tenants.CreatedTenant
    env: dict[str, str]

    def outlast(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [OUTLAST, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def two_webs(servers, tmp_path_factory) -> Iterator[TwoWebs]:
    log_dir = Path(tmp_path_factory.mktemp("two-webs"))
    with fresh_stack(servers, log_dir, ["two-webs"], WEB_CONCURRENCY="2") as fresh:
        procs = [fresh.stack.start("web"), fresh.stack.start("web")]  # started, then awaited
        urls = [f"http://127.0.0.1:{proc.port}" for proc in procs]
        for url in urls:
            wait_until(lambda u=url: _ready(u), 60, what=f"{url}/readyz")
        yield TwoWebs(urls, fresh.tenants["two-webs"], fresh.env)


def _ready(base_url: str) -> bool:
    try:
        return requests.get(base_url + "/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def status_of(base_url: str, key: str) -> int:
    # A new connection each time, so that requests spread over each web's workers.
    return requests.get(
        base_url + "/v1/tasks", headers={**bearer(key), "Connection": "close"}, timeout=5
    ).status_code


def poll(webs: TwoWebs, key: str, until: float) -> list[tuple[float, int]]:
    """``(time sent, status)`` of requests to both web processes in turn, until ``until``."""
    answers = []
    while time.time() < until:
        for base_url in webs.urls:
            sent = time.time()
            answers.append((sent, status_of(base_url, key)))
        time.sleep(0.05)
    return answers


def test_a_revoked_key_is_refused_by_every_web_process_within_the_bound(two_webs):
    # Given a key that both web processes have served (and cached)
    issued = json.loads(two_webs.outlast("tenants", "add-key", two_webs.tenant.name).stdout)
    key = issued["api_key"]
    for base_url in two_webs.urls:
        assert {status_of(base_url, key) for _ in range(20)} == {200}

    # When it is revoked
    [line] = key_lines(two_webs.outlast("tenants", "revoke-key", issued["prefix"]))
    revoked_at = parse_time(line["revoked_at"]).timestamp()

    # Then no web process accepts it later than the bound after the revocation
    answers = poll(two_webs, key, revoked_at + REVOCATION_BOUND_SECONDS + 0.5)
    accepted_after = [sent - revoked_at for sent, status in answers if status == 200]
    assert max(accepted_after, default=0.0) <= KEY_CACHE_SECONDS + 0.5, accepted_after
    assert KEY_CACHE_SECONDS + 0.5 <= REVOCATION_BOUND_SECONDS
    for base_url in two_webs.urls:
        assert {status_of(base_url, key) for _ in range(20)} == {401}
    # The tenant's other key is untouched.
    assert status_of(two_webs.urls[0], two_webs.tenant.api_key) == 200


def test_an_expired_key_is_refused_by_every_web_process_from_its_expiry_on(two_webs):
    ran = two_webs.outlast("tenants", "add-key", two_webs.tenant.name, "--expires-in", "6s")
    issued = json.loads(ran.stdout)
    expires_at = parse_time(issued["expires_at"]).timestamp()

    answers = poll(two_webs, issued["api_key"], expires_at + 1.5)

    # Before its expiry the key works on both (and sits in their caches) ...
    assert any(status == 200 for sent, status in answers if sent < expires_at - 0.5)
    # ... and from its expiry on no web process accepts it, cached or not.
    late = [(round(sent - expires_at, 3), s) for sent, s in answers if sent >= expires_at + 0.01]
    assert late and all(status == 401 for _, status in late), late
    for base_url in two_webs.urls:
        assert {status_of(base_url, issued["api_key"]) for _ in range(10)} == {401}
