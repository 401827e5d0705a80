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
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app import db

log = logging.getLogger(__name__)

RUN_STEP = "outlast.run_step"
STEPS_QUEUE = "steps"
DELIVER_WEBHOOK = "outlast.deliver_webhook"
WEBHOOKS_QUEUE = "webhooks"

# The relay leaves rows younger than this to the fast path that wrote them.
RELAY_GRACE_SECONDS = 2.0

# Key in Connection.info under which app.db.transaction collects messages to publish.
PENDING_KEY = "outlast_outbox_pending"


class PendingMessage(NamedTuple):
    outbox_id: int
    task_name: str
    queue: str
    args: list[Any]
    agent: str | None = None  # the task's agent, for a readable name in Flower


def add(
    conn: Connection,
    task_name: str,
    args: Sequence[Any],
    *,
    queue: str,
    task_id: str | None = None,
) -> int:
    """Queue a Celery message to be published once this transaction commits.

    Inside :func:`app.db.transaction` the message is published right after the commit;
    elsewhere the relay publishes it within a few seconds.
    """
    args = list(args)
    outbox_id, agent = conn.execute(
        sa.text(
            "INSERT INTO outbox (task_name, queue, args, task_id) "
            "VALUES (:name, :queue, CAST(:args AS jsonb), :task_id) "
            "RETURNING id, (SELECT agent FROM tasks WHERE tasks.id = outbox.task_id)"
        ),
        {"name": task_name, "queue": queue, "args": json.dumps(args), "task_id": task_id},
    ).one()
    pending = conn.info.get(PENDING_KEY)
    if pending is not None:
        pending.append(PendingMessage(outbox_id, task_name, queue, args, agent))
    return outbox_id


def add_step(conn: Connection, task_id: str, step: int) -> int:
    """Queue the message that runs step ``step`` of ``task_id``."""
    return add(conn, RUN_STEP, [task_id, step], queue=STEPS_QUEUE, task_id=task_id)


def _send(task_name: str, queue: str, args: list[Any], agent: str | None = None) -> None:
    from workers.celery_app import celery, message_labels

    # ignore_result: no result-backend subscription per message (it would leak in the web
    # process, and with Redis down it retries for ~20 s before the publish even starts).
    celery().send_task(
        task_name, args=args, queue=queue, ignore_result=True, **message_labels(task_name, args, agent)
    )


def publish(messages: Iterable[PendingMessage]) -> int:
    """Send committed outbox messages now and delete their rows; returns how many went.

    Failures are logged, never raised: the relay sends what is left. A message the relay
    also sends (it waits RELAY_GRACE_SECONDS first) is a harmless duplicate.
    """
    sent: list[int] = []
    for message in messages:
        try:
            _send(message.task_name, message.queue, message.args, message.agent)
        except Exception as exc:  # broker down: the relay retries
            log.warning("outbox publish deferred to the relay: %s", exc)
            break
        sent.append(message.outbox_id)
    if sent:
        try:
            with db.engine().begin() as conn:
                conn.execute(sa.text("DELETE FROM outbox WHERE id = ANY(:ids)"), {"ids": sent})
        except Exception as exc:  # the relay will send them again: duplicates are fenced
            log.warning("outbox rows sent but not deleted: %s", exc)
    return len(sent)


def relay_due(limit: int = 500) -> int:
    """Publish outbox rows older than the grace period (the beat's relay). Returns the
    number sent. Rows are claimed with SKIP LOCKED, so two relays never send one row."""
    with db.transaction() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, task_name, queue, args, "
                "(SELECT agent FROM tasks WHERE tasks.id = outbox.task_id) AS agent FROM outbox "
                "WHERE created_at < now() - make_interval(secs => :grace) "
                "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"grace": RELAY_GRACE_SECONDS, "limit": limit},
        ).all()
        sent = []
        for row in rows:
            try:
                _send(row.task_name, row.queue, row.args, row.agent)
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
