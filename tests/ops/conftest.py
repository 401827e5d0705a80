"""Helpers for the operators', deployers' and callers' tests.

``ops_stack`` is one web + worker + beat stack (the Procfile's lines as subprocesses) on a
database of its own, shared by the tests of a module: starting it once keeps the client
and CLI tests to seconds. Tests using it talk to it over HTTP only, and never request the
function-scoped ``redis_url``/``env`` fixtures (flushing Redis under a live worker would
drop its queue bindings).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import fresh_stack
from tests.harness import Stack


def scrape_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from a scrape, or ``None`` when it is absent."""
    return scrape_samples(text).get((name, tuple(sorted(labels.items()))))


@dataclass
class OpsStack:
    stack: Stack
    base_url: str
    api_key: str
    tenant_id: str
    database_url: str
    webhook_secret: str

    def count(self, sql: str, **params: object) -> int:
        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(sql), params).scalar_one()
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def ops_stack(servers, tmp_path_factory) -> Iterator[OpsStack]:
    """web, worker and beat on a fresh database, with one tenant; stopped at the end."""
    log_dir = Path(tmp_path_factory.mktemp("ops-logs"))
    with fresh_stack(servers, log_dir, ["ops"], WEB_CONCURRENCY="1") as fresh:
        stack, created = fresh.stack, fresh.tenants["ops"]
        stack.start("web")
        worker = stack.start("worker")
        stack.start("beat")
        stack.wait_ready()
        stack.wait_worker_ready(worker)
        yield OpsStack(
            stack,
            stack.base_url,
            created.api_key,
            created.tenant_id,
            fresh.database_url,
            created.webhook_secret,
        )
