"""Fixtures every test uses: real PostgreSQL, real Redis, real Celery workers.

- PostgreSQL: ``DATABASE_URL`` when set, else an embedded server for the session. The
  schema is migrated once into a template database; each test gets a fresh database
  copied from it (``CREATE DATABASE … TEMPLATE``), dropped afterwards.
- Redis: ``REDIS_URL`` when set, else an embedded server for the session; flushed
  before each test.
- ``celery_worker``: an in-process worker (thread pool) on the test's database.
- ``stack``: the Procfile's processes as real subprocesses (see ``tests/harness.py``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib
import sqlalchemy as sa

from app import settings as settings_mod
from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis
from app.ops import metrics
from app.settings import Settings, database_url_for_sqlalchemy
from app.store import db, tenants
from tests.harness import Stack

ROOT = Path(__file__).resolve().parent.parent

# Short intervals so that fault and sweep tests finish in seconds.
TEST_ENV = {
    "OUTLAST_LEASE_SECONDS": "3",
    "OUTLAST_REAPER_INTERVAL_SECONDS": "1",
    "OUTLAST_WEBHOOK_SWEEP_SECONDS": "0.5",
    "OUTLAST_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "OUTLAST_WEBHOOK_TIMEOUT_SECONDS": "3",
    "OUTLAST_WEBHOOK_ALLOW_PRIVATE": "1",
    "OUTLAST_LOG_FORMAT": "json",
    "OUTLAST_BIND_HOST": "127.0.0.1",
}


class Servers:
    """The session's PostgreSQL and Redis, and the template database."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self._pg: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None
        given_db = os.environ.get("DATABASE_URL")
        if given_db:
            self.admin_url = database_url_for_sqlalchemy(given_db)
        else:
            self._pg = EmbeddedPostgres(tmp / "postgres")
            self.admin_url = self._pg.start()
        given_redis = os.environ.get("REDIS_URL")
        if given_redis:
            self.redis_url = given_redis
        else:
            self._redis = EmbeddedRedis(tmp / "redis")
            self.redis_url = self._redis.start()
        self.admin = sa.create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        self.prefix = f"outlast_t{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.template = f"{self.prefix}_tpl"
        self._create(self.template)
        db.upgrade(self.url_for(self.template))
        self._counter = 0

    @property
    def embedded(self) -> bool:
        return self._pg is not None

    def url_for(self, database: str) -> str:
        url = sa.engine.make_url(self.admin_url)
        return url.set(database=database).render_as_string(hide_password=False)

    def _create(self, name: str, template: str | None = None) -> None:
        with self.admin.connect() as conn:
            suffix = f" TEMPLATE {template}" if template else ""
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{suffix}')

    def drop(self, name: str) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def fresh_database(self) -> tuple[str, str]:
        self._counter += 1
        name = f"{self.prefix}_{self._counter}"
        self._create(name, self.template)
        return name, self.url_for(name)

    def close(self) -> None:
        self.drop(self.template)
        self.admin.dispose()
        if self._redis is not None:
            self._redis.stop()
        if self._pg is not None:
            self._pg.stop()


@dataclass
class FreshStack:
    """A stack's own database and tenants (see :func:`fresh_stack`)."""

    stack: Stack
    env: dict[str, str]
    database_url: str
    tenants: dict[str, tenants.CreatedTenant]  # by the name given, each made unique


def flush_redis(url: str) -> None:
    """Empty the session's Redis for a test. Metrics an earlier test recorded in this
    process are sent first (they wait up to 50 ms in memory), so they cannot land after
    the flush and count in this test's figures."""
    metrics.flush()
    client = redis_lib.Redis.from_url(url)
    client.flushall()
    client.close()


@contextmanager
def fresh_stack(
    servers: Servers, log_dir: Path, tenant_names: Sequence[str], **extra_env: str
) -> Iterator[FreshStack]:
    """A database of its own with ``tenant_names`` in it, a flushed Redis, and a
    :class:`Stack` to start the Procfile's processes on them (``TEST_ENV`` plus
    ``extra_env``). While it is open this process's settings point at that database, so
    the test can read and write it directly; at the end every process is stopped, the
    settings come back and the database is dropped. For module-scoped stacks: a stack
    per test costs seconds each."""
    name, database_url = servers.fresh_database()
    flush_redis(servers.redis_url)
    env = {"DATABASE_URL": database_url, "REDIS_URL": servers.redis_url, **TEST_ENV, **extra_env}
    previous = settings_mod._current
    settings_mod.configure(Settings.from_env(env))
    stack = Stack(ROOT, env, log_dir)
    try:
        with db.transaction() as conn:
            made = {t: tenants.create(conn, f"{t}-{uuid.uuid4().hex[:8]}") for t in tenant_names}
        yield FreshStack(stack, env, database_url, made)
    finally:
        stack.stop_all()
        db.dispose()
        settings_mod._current = previous
        servers.drop(name)


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("servers"))
    yield s
    s.close()


@pytest.fixture
def database_url(servers: Servers) -> Iterator[str]:
    """A fresh, migrated database for this test (SQLAlchemy URL)."""
    name, url = servers.fresh_database()
    yield url
    db.dispose()
    servers.drop(name)


@pytest.fixture
def redis_url(servers: Servers) -> str:
    """The session's Redis, flushed for this test."""
    flush_redis(servers.redis_url)
    return servers.redis_url


@pytest.fixture
def env(database_url: str, redis_url: str) -> dict[str, str]:
    """Environment variables for this test's processes (and its in-process settings)."""
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_url, **TEST_ENV}


@pytest.fixture
def settings(env: dict[str, str]) -> Iterator[Settings]:
    """This test's settings, installed as the process's settings."""
    previous = settings_mod._current
    s = settings_mod.configure(Settings.from_env(env))
    yield s
    db.dispose()
    settings_mod._current = previous


@pytest.fixture
def flask_app(settings: Settings):
    from workers.celery_app import create_app

    return create_app(settings)


@pytest.fixture
def client(flask_app):
    return flask_app.test_client()


@pytest.fixture
def tenant(settings: Settings) -> tenants.CreatedTenant:
    with db.transaction() as conn:
        return tenants.create(conn, f"acme-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def auth(tenant: tenants.CreatedTenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.api_key}"}


@pytest.fixture
def celery_worker(flask_app) -> Iterator[object]:
    """A real Celery worker in this process (thread pool) consuming every queue."""
    from celery.contrib.testing.worker import start_worker

    celery_app = flask_app.extensions["celery"]
    celery_app.loader.import_default_modules()
    with start_worker(
        celery_app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
        queues=["steps", "webhooks", "maintenance"],
    ) as worker:
        yield worker


@pytest.fixture
def stack(env: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """The Procfile's processes as subprocesses; every one is stopped at the end."""
    s = Stack(ROOT, env, tmp_path / "logs")
    yield s
    s.stop_all()
