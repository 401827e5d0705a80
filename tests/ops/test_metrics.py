"""GET /metrics: what every process records, read back through the web process's scrape.

These run in-process (Flask test client, real PostgreSQL and Redis); the cross-process
proof (a worker subprocess's steps in the web subprocess's scrape) is in test_stack.py.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from app import settings as settings_mod
from app.engine import sweeps
from app.ops import metrics
from app.store import db, lifecycle
from tests.ops.conftest import sample


def _create_task(tenant_id: str, agent: str = "echo") -> str:
    with db.transaction() as conn:
        row = lifecycle.create(
            conn,
            tenant_id=tenant_id,
            agent=agent,
            input={"message": "hi"},
            metadata={},
            webhook_url=None,
            timeout_seconds=None,
            idempotency_key=None,
        )
    return row["id"]


def _scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200, response.data
    return response.get_data(as_text=True)


def test_metrics_are_prometheus_text_and_need_no_api_key(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)
    assert "# TYPE outlast_tasks_submitted_total counter" in text
    assert "# TYPE outlast_step_duration_seconds histogram" in text
    assert sample(text, "outlast_metrics_source_up", source="redis") == 1
    assert sample(text, "outlast_metrics_source_up", source="database") == 1


def test_submissions_and_terminal_transitions_are_counted_once_committed(client, tenant):
    first = _create_task(tenant.tenant_id)
    _create_task(tenant.tenant_id)
    _create_task(tenant.tenant_id, agent="approval")
    with pytest.raises(RuntimeError):  # a transaction that rolls back counts nothing
        with db.transaction() as conn:
            lifecycle.create(
                conn,
                tenant_id=tenant.tenant_id,
                agent="echo",
                input={},
                metadata={},
                webhook_url=None,
                timeout_seconds=None,
                idempotency_key=None,
            )
            raise RuntimeError("rolled back")
    with db.transaction() as conn:
        lifecycle.cancel(conn, first, tenant.tenant_id)
    with db.transaction() as conn:  # cancelling again matches nothing: not counted again
        assert lifecycle.cancel(conn, first, tenant.tenant_id) is None

    text = _scrape(client)

    assert sample(text, "outlast_tasks_submitted_total", agent="echo") == 2
    assert sample(text, "outlast_tasks_submitted_total", agent="approval") == 1
    assert sample(text, "outlast_tasks_finished_total", agent="echo", status="cancelled") == 1


def test_queue_depth_and_outbox_backlog_are_measured_at_scrape(client, flask_app, tenant):
    celery_app = flask_app.extensions["celery"]
    for _ in range(3):  # no worker consumes here: the messages wait in their queue
        celery_app.send_task("outlast.deliver_webhook", args=["dlv_x"], queue="webhooks")
    task_id = _create_task(tenant.tenant_id)
    with db.engine().begin() as conn:  # rows a process wrote and died before publishing
        for _ in range(2):
            conn.execute(
                sa.text(
                    "INSERT INTO outbox (task_name, queue, args, task_id) "
                    "VALUES ('outlast.run_step', 'steps', CAST(:args AS jsonb), :id)"
                ),
                {"args": json.dumps([task_id, 0]), "id": task_id},
            )

    text = _scrape(client)

    assert sample(text, "outlast_queue_depth", queue="webhooks") == 3
    assert sample(text, "outlast_queue_depth", queue="steps") == 0
    assert sample(text, "outlast_queue_depth", queue="maintenance") == 0
    assert sample(text, "outlast_outbox_backlog") == 2
    assert sample(text, "outlast_outbox_oldest_age_seconds") >= 0


def test_step_durations_tool_calls_webhooks_and_reaped_leases_are_exposed(client):
    metrics.step_finished("echo", "continued", 0.3)
    metrics.step_finished("echo", "continued", 0.7)
    metrics.step_finished("echo", "completed", 7200)
    metrics.tool_call("http_get", "completed")
    metrics.tool_call("http_get", "replayed")
    metrics.tool_call("http_get", "completed")
    metrics.webhook_attempt("delivered")
    metrics.webhook_attempt("retrying")
    metrics.lease_reaped("retried")

    text = _scrape(client)

    name = "outlast_step_duration_seconds"
    assert sample(text, f"{name}_bucket", agent="echo", outcome="continued", le="0.25") == 0
    assert sample(text, f"{name}_bucket", agent="echo", outcome="continued", le="0.5") == 1
    assert sample(text, f"{name}_bucket", agent="echo", outcome="continued", le="1.0") == 2
    assert sample(text, f"{name}_bucket", agent="echo", outcome="continued", le="+Inf") == 2
    assert sample(text, f"{name}_count", agent="echo", outcome="continued") == 2
    assert sample(text, f"{name}_sum", agent="echo", outcome="continued") == pytest.approx(1.0)
    assert sample(text, f"{name}_bucket", agent="echo", outcome="completed", le="3600.0") == 0
    assert sample(text, f"{name}_bucket", agent="echo", outcome="completed", le="+Inf") == 1
    assert sample(text, "outlast_tool_calls_total", tool="http_get", outcome="completed") == 2
    assert sample(text, "outlast_tool_calls_total", tool="http_get", outcome="replayed") == 1
    assert sample(text, "outlast_webhook_attempts_total", outcome="delivered") == 1
    assert sample(text, "outlast_webhook_attempts_total", outcome="retrying") == 1
    assert sample(text, "outlast_leases_reaped_total", outcome="retried") == 1


def test_reaping_an_expired_lease_is_counted(client, tenant, settings):
    task_id = _create_task(tenant.tenant_id)
    with db.transaction() as conn:
        lifecycle.acquire_lease(conn, task_id, 0, "tok", 30)
        conn.execute(
            sa.text(
                "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = :id"
            ),
            {"id": task_id},
        )
    # When the reaper sweeps it, the task is retried (attempt 2)...
    assert sweeps.reap_expired_leases() == 1
    with db.engine().connect() as conn:
        assert lifecycle.get(conn, task_id)["attempt"] == 2

    # ...and the scrape counts it
    assert sample(_scrape(client), "outlast_leases_reaped_total", outcome="retried") == 1


def test_scrape_still_answers_when_redis_is_unreachable(client, settings):
    from app.dev.embedded import free_port

    settings_mod.configure(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    metrics.step_finished("echo", "continued", 0.1)  # dropped with a log line, not raised

    text = _scrape(client)

    assert sample(text, "outlast_metrics_source_up", source="redis") == 0
    assert sample(text, "outlast_metrics_source_up", source="database") == 1


def test_tasks_stranded_counts_tasks_no_live_worker_can_take_per_version(client, tenant):
    # Given: echo tasks on versions 1 and 2 and a live worker for version 1 only
    from app.store import fleet

    for version in ("1", "2", "2"):
        with db.transaction() as conn:
            lifecycle.create(
                conn,
                tenant_id=tenant.tenant_id,
                agent="echo",
                input={},
                metadata={},
                webhook_url=None,
                timeout_seconds=None,
                idempotency_key=None,
                agent_version=version,
            )
    with db.transaction() as conn:
        fleet.beat(conn, "w1", [("echo", "1")], 30)

    text = _scrape(client)

    # Then version 2's tasks are stranded, version 1's are not
    assert sample(text, "outlast_tasks_stranded", agent="echo", version="2") == 2
    assert sample(text, "outlast_tasks_stranded", agent="echo", version="1") == 0

    # When the worker goes away, version 1's task is stranded too
    with db.transaction() as conn:
        fleet.forget(conn, "w1")
    assert sample(_scrape(client), "outlast_tasks_stranded", agent="echo", version="1") == 1


def test_steps_queue_depth_counts_every_agent_versions_queue(client, flask_app, tenant):
    # Given step messages for two versions (no worker consumes here)
    from app.store import outbox

    for version in ("1", "2"):
        with db.transaction() as conn:
            row = lifecycle.create(
                conn,
                tenant_id=tenant.tenant_id,
                agent="echo",
                input={},
                metadata={},
                webhook_url=None,
                timeout_seconds=None,
                idempotency_key=None,
                agent_version=version,
            )
            outbox.add_step(conn, row["id"], 0)

    # Then the steps depth is both version queues together
    assert sample(_scrape(client), "outlast_queue_depth", queue="steps") == 2
