"""Helpers for the step engine's tests: submit a task straight through lifecycle + outbox
(what POST /v1/tasks does), read it back, and wait for a status."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.store import db, lifecycle, outbox
from tests.engine.servers import LocalServer, json_answer
from tests.harness import wait_until


class Tasks:
    """Submit and inspect tasks of one tenant."""

    def __init__(self, tenant_id: str):
        self.tenant_id = tenant_id

    def submit(
        self, agent: str, input: dict[str, Any], *, timeout_seconds: int | None = None
    ) -> str:
        with db.transaction() as conn:
            row = lifecycle.create(
                conn,
                tenant_id=self.tenant_id,
                agent=agent,
                input=input,
                metadata={},
                webhook_url=None,
                timeout_seconds=timeout_seconds,
                idempotency_key=None,
            )
            outbox.add_step(conn, row["id"], 0)
        return row["id"]

    def get(self, task_id: str) -> sa.RowMapping:
        with db.engine().connect() as conn:
            row = lifecycle.get(conn, task_id)
        assert row is not None
        return row

    def wait_status(
        self, task_id: str, statuses: str | Iterable[str], timeout: float = 30.0
    ) -> sa.RowMapping:
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)

        def reached() -> sa.RowMapping | None:
            row = self.get(task_id)
            return row if row["status"] in wanted else None

        return wait_until(reached, timeout, interval=0.05, what=f"{task_id} in {wanted}")

    def scalar(self, sql: str, **params: Any) -> Any:
        with db.engine().begin() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[sa.RowMapping]:
        with db.engine().connect() as conn:
            return list(conn.execute(sa.text(sql), params).mappings())

    def event_types(self, task_id: str) -> list[str]:
        return [
            r["type"]
            for r in self.rows(
                "SELECT type FROM events WHERE task_id = :id ORDER BY seq", id=task_id
            )
        ]


@pytest.fixture
def tasks(tenant) -> Tasks:
    return Tasks(tenant.tenant_id)


ROOT = Path(__file__).resolve().parents[2]
TEST_AGENTS = "tests.engine.agents_for_tests"


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The engine tests' agents are importable by every process the test starts."""
    return {
        **env,
        "OUTLAST_AGENTS": TEST_AGENTS,
        "OUTLAST_STEP_RETRY_BASE_SECONDS": "0.2",
        "PYTHONPATH": str(ROOT),  # `tests.engine.agents_for_tests` in worker subprocesses
    }


@pytest.fixture
def ledger():
    """A callee that answers every request 200 with ``{"ok": true}`` and counts them."""
    server = LocalServer(lambda r: json_answer(200, {"ok": True}))
    yield server
    server.close()
