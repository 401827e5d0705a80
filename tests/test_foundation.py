"""The foundation: settings, migrations, the CLI, the Procfile, and `outlast up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from app.dev.processes import ManagedProcess, group_members
from app.settings import Settings, SettingsError
from app.store import db, tenants
from tests.harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
OUTLAST = str(Path(sys.executable).with_name("outlast"))


# --- settings ------------------------------------------------------------------------


def test_settings_defaults_are_runtime_md_table():
    s = Settings.from_env({})
    assert (s.database_url, s.redis_url, s.port) == (None, None, 8000)
    assert (s.lease_seconds, s.reaper_interval_seconds) == (30, 10)
    assert (s.max_attempts, s.step_retries, s.idempotency_ttl_seconds) == (5, 3, 86400)
    assert (s.webhook_retry_base_seconds, s.webhook_max_attempts) == (5, 15)
    assert (s.webhook_timeout_seconds, s.webhook_sweep_seconds) == (10, 5)
    assert s.webhook_allow_private is False
    assert (s.max_body_bytes, s.task_retention_days, s.agents) == (1048576, 30, ())
    assert (s.llm_base_url, s.llm_api_key, s.llm_model) == (None, None, None)


def test_heroku_postgres_url_is_rewritten_to_psycopg2():
    s = Settings.from_env({"DATABASE_URL": "postgres://u:p@db.example:5432/x"})
    assert s.database_url == "postgresql+psycopg2://u:p@db.example:5432/x"
    s = Settings.from_env({"DATABASE_URL": "postgresql://u@h/x"})
    assert s.database_url == "postgresql+psycopg2://u@h/x"


@pytest.mark.parametrize(
    "env",
    [
        {"DATABASE_URL": "mysql://x/y"},
        {"REDIS_URL": "http://x"},
        {"OUTLAST_MAX_ATTEMPTS": "five"},
        {"OUTLAST_MAX_ATTEMPTS": "0"},
        {"OUTLAST_WEBHOOK_ALLOW_PRIVATE": "maybe"},
        {"OUTLAST_LOG_FORMAT": "xml"},
    ],
)
def test_unusable_settings_are_refused_with_the_variable_named(env):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert next(iter(env)) in str(err.value)


def test_log_format_is_auto_unless_json_or_console_is_asked_for():
    assert Settings.from_env({}).log_format == "auto"
    assert Settings.from_env({"OUTLAST_LOG_FORMAT": "JSON"}).log_format == "json"
    assert Settings.from_env({"OUTLAST_LOG_FORMAT": "console"}).log_format == "console"
    assert Settings.from_env({"OUTLAST_LOG_FORMAT": "text"}).log_format == "console"  # old name


def test_agents_list_is_split_on_commas():
    s = Settings.from_env({"OUTLAST_AGENTS": "a.b, c.d ,,"})
    assert s.agents == ("a.b", "c.d")


# --- migrations and release ---------------------------------------------------------------


@pytest.fixture
def empty_database(servers):
    name = f"{servers.prefix}_empty"
    servers.drop(name)
    with servers.admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield servers.url_for(name)
    servers.drop(name)


def _head_revision() -> str:
    """The newest revision in migrations/versions (what release must reach)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(db.alembic_config("postgresql://unused")).get_current_head()


@pytest.mark.smoke
def test_release_twice_is_harmless(empty_database, stack):
    stack.env["DATABASE_URL"] = empty_database
    assert stack.run("release") == 0, stack.logs()
    assert stack.run("release") == 0, stack.logs()
    assert db.current_revision(empty_database) == _head_revision()
    eng = sa.create_engine(empty_database, poolclass=sa.pool.NullPool)
    with eng.connect() as conn:
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
    eng.dispose()
    assert {
        "tenants",
        "api_keys",
        "tasks",
        "checkpoints",
        "tool_calls",
        "events",
        "idempotency_keys",
        "outbox",
        "webhook_deliveries",
        "webhook_secrets",
    } <= tables


def test_pending_deliveries_are_indexed_by_tenant_and_the_migration_downgrades(empty_database):
    """Migration 0006: the per-tenant count of webhook sends in flight reads an index of
    that tenant's pending deliveries (not every tenant's); down and up again cleanly."""
    from alembic import command

    def indexdef() -> str | None:
        eng = sa.create_engine(empty_database, poolclass=sa.pool.NullPool)
        with eng.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT indexdef FROM pg_indexes "
                    "WHERE indexname = 'webhook_deliveries_tenant_pending'"
                )
            ).scalar()
        eng.dispose()
        return found

    db.upgrade(empty_database)
    assert indexdef() == (
        "CREATE INDEX webhook_deliveries_tenant_pending ON public.webhook_deliveries "
        "USING btree (tenant_id, next_attempt_at) WHERE (status = 'pending'::delivery_status)"
    )
    command.downgrade(db.alembic_config(empty_database), "0005")
    assert indexdef() is None
    assert db.current_revision(empty_database) == "0005"
    db.upgrade(empty_database)
    assert indexdef() is not None and db.current_revision(empty_database) == _head_revision()


def test_release_without_database_url_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run(
        [OUTLAST, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "DATABASE_URL is not set" in out.stderr


# --- tenants --------------------------------------------------------------------------------


@pytest.mark.smoke
def test_tenants_create_prints_the_json_of_api_md(env, settings):
    out = subprocess.run(
        [OUTLAST, "tenants", "create", "acme"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert set(created) == {"tenant_id", "name", "api_key", "webhook_secret"}
    assert created["name"] == "acme"
    assert created["webhook_secret"].startswith("whsec_")
    with db.transaction() as conn:
        assert tenants.tenant_for_api_key(conn, created["api_key"]) == created["tenant_id"]
        stored = conn.execute(sa.text("SELECT key_hash FROM api_keys")).scalar_one()
    assert created["api_key"] not in stored  # stored hashed

    again = subprocess.run(
        [OUTLAST, "tenants", "create", "acme"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "already exists" in again.stderr


# --- the Procfile ---------------------------------------------------------------------------


def test_procfile_has_the_five_processes_of_runtime_md():
    from tests.harness import read_procfile

    procfile = read_procfile(ROOT)
    assert set(procfile) == {"release", "web", "worker", "beat", "flower"}
    assert "REMAP_SIGTERM=SIGQUIT" in procfile["worker"]


@pytest.mark.smoke
def test_each_procfile_line_starts_with_only_environment_variables(stack):
    web = stack.start("web")
    worker = stack.start("worker")
    beat = stack.start("beat")
    flower = stack.start("flower", {"OUTLAST_FLOWER_BASIC_AUTH": "ops:s3cret"})
    stack.wait_ready()
    stack.wait_worker_ready(worker)
    wait_until(lambda: "beat: Starting" in beat.log_text(), 90, what="beat start")
    flower_url = f"http://127.0.0.1:{flower.port}/api/workers"

    def flower_answers():
        try:
            return requests.get(flower_url, timeout=2).status_code == 401
        except requests.RequestException:
            return False

    wait_until(flower_answers, 90, what="flower 401 without credentials")
    assert requests.get(flower_url, auth=("ops", "s3cret"), timeout=5).status_code == 200
    assert web.alive() and worker.alive() and beat.alive() and flower.alive()


def test_flower_refuses_to_start_without_basic_auth(stack):
    flower = stack.start("flower", {"OUTLAST_FLOWER_BASIC_AUTH": ""})
    assert flower.process.wait(60) != 0
    assert "OUTLAST_FLOWER_BASIC_AUTH" in flower.log_text()


# --- outlast up -----------------------------------------------------------------------------


@pytest.fixture
def outside_pytest_tmp():
    """A folder for embedded servers not under pytest's tmp dir: as root, pgserver runs
    PostgreSQL as a user of its own that must traverse every parent, and any pytest
    session starting meanwhile resets /tmp/pytest-of-root to 0700."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="outlast-foundation-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.smoke
@pytest.mark.slow
def test_outlast_up_on_embedded_servers_serves_then_stops_everything(outside_pytest_tmp):
    from app.dev.embedded import free_port

    tmp_path = outside_pytest_tmp

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["PORT"] = str(port)
    up = ManagedProcess(
        "up",
        [OUTLAST, "up", "--var-dir", str(tmp_path / "var")],
        env=env,
        log_path=tmp_path / "up.log",
    ).start()
    try:

        def ready():
            try:
                return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, 60, what="outlast up /readyz")
        log = up.log_text()
        assert f"OUTLAST_URL=http://127.0.0.1:{port}\n" in log
        key = next(line for line in log.splitlines() if line.startswith("OUTLAST_API_KEY="))
        assert len(key) > len("OUTLAST_API_KEY=") + 20
        descendants = _descendants(up.pid)
        assert len(descendants) >= 3  # web, worker, beat (and their children)
    finally:
        up.signal_group(signal.SIGINT)
        try:
            up.process.wait(60)
        except subprocess.TimeoutExpired:
            up.signal_group(signal.SIGKILL)  # its warden then stops the rest
            pytest.fail(f"outlast up did not stop within 60 s of a Ctrl-C:\n{up.log_text()}")
    assert up.process.returncode == 0, up.log_text()
    wait_until(lambda: not any(_exists(p) for p in descendants), 30, what="children gone")
    assert not group_members(up.pid)
    # The embedded servers are stopped as well.
    assert "postmaster.pid" not in os.listdir(tmp_path / "var" / "postgres")
    assert not [p for p in _all_cmdlines() if str(tmp_path) in p]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines()[1:]:
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _all_cmdlines() -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rediss://h:6380/0", "CERT_REQUIRED"),
        ("rediss://h:6380/0?ssl_cert_reqs=none", "CERT_NONE"),
        ("rediss://h:6380/0?ssl_cert_reqs=CERT_OPTIONAL", "CERT_OPTIONAL"),
    ],
)
def test_rediss_urls_verify_certificates_unless_the_url_says_otherwise(url, expected):
    from workers.celery_app import celery_config

    config = celery_config(Settings.from_env({"REDIS_URL": url}))
    assert config["broker_use_ssl"]["ssl_cert_reqs"].name == expected
    assert config["redis_backend_use_ssl"]["ssl_cert_reqs"].name == expected


def test_rediss_url_with_an_unknown_cert_mode_is_refused():
    from workers.celery_app import celery_config

    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        celery_config(Settings.from_env({"REDIS_URL": "rediss://h/0?ssl_cert_reqs=maybe"}))


def test_every_sweep_message_expires_so_none_pile_up_without_workers():
    from workers.beat import beat_schedule

    schedule = beat_schedule(Settings.from_env({}))
    assert {e["task"] for e in schedule.values()} >= {
        "outlast.sweep.reap",
        "outlast.sweep.relay_outbox",
        "outlast.sweep.wake_timers",
        "outlast.sweep.webhooks",
        "outlast.sweep.redispatch_lost",
    }
    for entry in schedule.values():
        assert 0 < entry["options"]["expires"] <= max(2 * entry["schedule"], 2.0)


def test_a_pooled_connection_cut_by_the_server_is_replaced_after_it_sat_idle(settings):
    import time

    with db.engine().connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    # The server cuts the pooled connection (as a database restart would).
    killer = sa.create_engine(settings.database_url, poolclass=sa.pool.NullPool)
    with killer.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    killer.dispose()
    time.sleep(1.2)  # longer than db.PING_IDLE_SECONDS
    with db.engine().connect() as conn:
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
