"""Fixtures of the fault tests: the ledger, the status watcher, an API client, private
PostgreSQL and Redis servers that a test may stop without disturbing any other test,
and a way to start the Procfile's processes and wait until they serve.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis as redis_lib
import requests
import sqlalchemy as sa

from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis
from app.dev.processes import ManagedProcess
from app.store import db, tenants
from tests.faults.ledger import Ledger, Request
from tests.faults.watcher import TERMINAL, StatusWatcher
from tests.harness import Stack, wait_until

# Lighter processes than the defaults: the machine running the suite is small.
FAULT_ENV = {
    "WEB_CONCURRENCY": "1",
    "OUTLAST_WEB_THREADS": "8",
    "OUTLAST_WORKER_CONCURRENCY": "2",
    "OUTLAST_LOG_LEVEL": "INFO",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/faults kills or stops real processes."""
    for item in items:
        if "tests/faults/" in str(item.fspath).replace("\\", "/"):
            if not item.get_closest_marker("faults"):
                raise pytest.UsageError(f"{item.nodeid} lacks @pytest.mark.faults")


# --- the outside world ------------------------------------------------------------------------


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    server = Ledger()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def watcher(request: pytest.FixtureRequest) -> Iterator[StatusWatcher]:
    """Runs during every fault test (the test starts it on its database); a test that
    runs processes and never starts it fails, and so does one during which it saw a
    regression."""
    w = StatusWatcher()
    yield w
    w.stop()
    if not w.started:
        assert "stack" not in request.fixturenames, "the test never started the status watcher"
        return
    print(w.summary())
    w.assert_clean()


# --- the API as a client sees it ---------------------------------------------------------------


class Client:
    """A small client of API.md for one tenant."""

    def __init__(self, base_url: str, api_key: str):
        self.base_url = base_url
        self.api_key = api_key
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    def submit(
        self,
        agent: str,
        input: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: float = 20.0,
        **fields: Any,
    ) -> requests.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.session.post(
            f"{self.base_url}/v1/tasks",
            json={"agent": agent, "input": input, **fields},
            headers=headers,
            timeout=timeout,
        )

    def create(self, agent: str, input: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """Submit and insist on 202; the task."""
        response = self.submit(agent, input, **kw)
        assert response.status_code == 202, (response.status_code, response.text)
        return response.json()

    def get(self, task_id: str) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/v1/tasks/{task_id}", timeout=10)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()

    def cancel(self, task_id: str) -> requests.Response:
        return self.session.post(f"{self.base_url}/v1/tasks/{task_id}/cancel", timeout=10)

    def events(self, task_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            response = self.session.get(
                f"{self.base_url}/v1/tasks/{task_id}/events",
                params={"after": after, "limit": 1000},
                timeout=10,
            )
            assert response.status_code == 200, (response.status_code, response.text)
            page = response.json()
            found.extend(page["data"])
            if not page.get("next_cursor"):
                return found
            after = int(page["next_cursor"])

    def deliveries(self, task_id: str) -> list[dict[str, Any]]:
        response = self.session.get(f"{self.base_url}/v1/tasks/{task_id}/deliveries", timeout=10)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()["data"]

    def wait_terminal(self, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll until the task is terminal (tolerating a moment of unavailability)."""

        def terminal() -> dict[str, Any] | None:
            try:
                response = self.session.get(f"{self.base_url}/v1/tasks/{task_id}", timeout=5)
            except requests.RequestException:
                return None
            if response.status_code == 200 and response.json()["status"] in TERMINAL:
                return response.json()
            return None

        return wait_until(terminal, timeout, 0.2, what=f"{task_id} terminal")  # type: ignore[return-value]

    def wait_all_terminal(self, task_ids: list[str], timeout: float = 60.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        return {t: self.wait_terminal(t, max(1.0, deadline - time.monotonic())) for t in task_ids}


def new_tenant(database_url: str) -> tenants.CreatedTenant:
    """A tenant in ``database_url``, made with a connection of our own."""
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            return tenants.create(conn, f"faults-{uuid.uuid4().hex[:8]}")
    finally:
        engine.dispose()


def query(database_url: str, sql: str, **params: Any) -> list[sa.RowMapping]:
    """Rows of one read-only query (for assertions on what the database holds)."""
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).mappings())
    finally:
        engine.dispose()


# --- private servers ---------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own (its port survives stop/start)."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class PrivatePostgres:
    """A PostgreSQL of this test's own, migrated, that the test may stop and start."""

    def __init__(self, data_dir: Path):
        self.server = EmbeddedPostgres(data_dir)
        self.server.start()
        self.url = self.server.url_for("postgres")
        db.upgrade(self.url)

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()
        assert self.server.url_for("postgres") == self.url, "the socket moved on restart"


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(tmp_path / "pg")
    yield pg
    pg.stop()


# --- the processes -----------------------------------------------------------------------------


class Processes:
    """Start the Procfile's processes for one fault test and wait until they serve."""

    def __init__(self, stack: Stack):
        self.stack = stack
        stack.env.update(FAULT_ENV)

    def start(self, *names: str, extra_env: dict[str, str] | None = None) -> list[ManagedProcess]:
        """Start ``names`` (``web``, ``worker``, ``beat``) together; wait until web answers
        /readyz and each worker says it is ready."""
        procs = [self.stack.start(name, extra_env) for name in names]
        with ThreadPoolExecutor(len(procs)) as pool:
            waits = []
            for proc, name in zip(procs, names, strict=True):
                if name == "web":
                    waits.append(pool.submit(self.stack.wait_ready, 60))
                elif name == "worker":
                    waits.append(pool.submit(self.stack.wait_worker_ready, proc, 60))
            for w in waits:
                try:
                    w.result()
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{self.stack.logs()}") from exc
        return procs

    def spawn(self, name: str) -> ManagedProcess:
        """Start ``name`` without waiting for it (a platform restarting a dead process)."""
        return self.stack.start(name)

    def holder_of(self, request: Request) -> ManagedProcess:
        """The process (group) whose socket made ``request``, found by its client port."""
        for conn in psutil.net_connections("tcp"):
            if conn.pid and conn.laddr and conn.laddr.port == request.client_port:
                group = os.getpgid(conn.pid)
                for proc in self.stack.processes:
                    if proc.alive() and proc.pid == group:
                        return proc
        raise AssertionError(f"no live process holds the connection of {request}")

    def kill(self, proc: ManagedProcess) -> float:
        """SIGKILL the whole process group; the monotonic time of the kill."""
        at = time.monotonic()
        self.stack.kill(proc)
        return at

    def stop(self, proc: ManagedProcess) -> None:
        self.stack.stop(proc)

    def logs(self) -> str:
        return self.stack.logs()


@pytest.fixture
def procs(stack: Stack) -> Iterator[Processes]:
    p = Processes(stack)
    yield p
    # A graceful stop waits for running steps (up to the soft shutdown timeout); what a
    # fault test leaves running is of no interest, so end it the quick way.
    for proc in stack.processes:
        if proc.alive():
            proc.signal_group(signal.SIGKILL)
    stack.stop_all()


def celery_client(redis_url: str):
    """A bare Celery app on the test's broker, to publish messages by hand."""
    from celery import Celery

    app = Celery("faults-injector", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_timeout=3)
    return app


def queue_outstanding(redis_url: str, queue: str) -> int:
    """Messages of ``queue`` waiting in the broker or delivered but not yet acknowledged
    (kombu's Redis transport keeps the latter in the ``unacked`` hash)."""
    client = redis_lib.Redis.from_url(redis_url)
    try:
        queued = sum(
            client.llen(k) for k in client.scan_iter(f"{queue}*") if client.type(k) == b"list"
        )
        unacked = 0
        for raw in client.hvals("unacked"):
            _message, _exchange, routing_key = json.loads(raw)
            unacked += routing_key == queue
        return queued + unacked
    finally:
        client.close()
