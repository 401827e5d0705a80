"""The transactional outbox (DESIGN.md, mechanism 2).

A Celery message that a database change makes necessary is written as an ``outbox``
row in the same transaction. After the commit, :func:`publish` sends it and deletes the
row; if the broker is down or the process dies first, the beat's relay
(:func:`relay_due`) sends it later. A message may therefore be sent twice, never zero
times: the step runner's fencing makes a duplicate harmless.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app import db

log = logging.getLogger(__name__)

RUN_STEP = "outlast.run_step"
STEPS_QUEUE = "steps"

# The relay leaves rows younger than this to the fast path that wrote them.
RELAY_GRACE_SECONDS = 2.0


def add(
    conn: Connection,
    task_name: str,
    args: Sequence[Any],
    *,
    queue: str,
    task_id: str | None = None,
) -> int:
    """Queue a Celery message to be published once this transaction commits."""
    return conn.execute(
        sa.text(
            "INSERT INTO outbox (task_name, queue, args, task_id) "
            "VALUES (:name, :queue, CAST(:args AS jsonb), :task_id) RETURNING id"
        ),
        {"name": task_name, "queue": queue, "args": json.dumps(list(args)), "task_id": task_id},
    ).scalar_one()


def add_step(conn: Connection, task_id: str, step: int) -> int:
    """Queue the message that runs step ``step`` of ``task_id``."""
    return add(conn, RUN_STEP, [task_id, step], queue=STEPS_QUEUE, task_id=task_id)


def _send(task_name: str, queue: str, args: list[Any]) -> None:
    from workers.celery_app import celery

    celery().send_task(task_name, args=args, queue=queue)


def publish(outbox_ids: Iterable[int]) -> int:
    """Send these committed outbox rows now and delete them. Returns how many were sent.

    Failures are logged, never raised: the relay will send what is left.
    """
    ids = list(outbox_ids)
    if not ids:
        return 0
    sent: list[int] = []
    try:
        with db.transaction() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT id, task_name, queue, args FROM outbox WHERE id = ANY(:ids) "
                    "ORDER BY id FOR UPDATE SKIP LOCKED"
                ),
                {"ids": ids},
            ).all()
            for row in rows:
                _send(row.task_name, row.queue, row.args)
                sent.append(row.id)
            if sent:
                conn.execute(sa.text("DELETE FROM outbox WHERE id = ANY(:ids)"), {"ids": sent})
    except Exception as exc:  # broker or database down: the relay retries
        log.warning("outbox publish deferred to the relay: %s", exc)
        return 0
    return len(sent)


def relay_due(limit: int = 500) -> int:
    """Publish outbox rows older than the grace period (the beat's relay). Returns the
    number sent. Rows are claimed with SKIP LOCKED, so two relays never send one row."""
    with db.transaction() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, task_name, queue, args FROM outbox "
                "WHERE created_at < now() - make_interval(secs => :grace) "
                "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"grace": RELAY_GRACE_SECONDS, "limit": limit},
        ).all()
        sent = []
        for row in rows:
            try:
                _send(row.task_name, row.queue, row.args)
            except Exception as exc:
                log.warning("outbox relay: broker unavailable, %d rows wait: %s", len(rows), exc)
                break
            sent.append(row.id)
        if sent:
            conn.execute(sa.text("DELETE FROM outbox WHERE id = ANY(:ids)"), {"ids": sent})
    return len(sent)


def backlog() -> int:
    """Rows not yet published (a metric)."""
    with db.engine().connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar_one()
