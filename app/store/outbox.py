"""The transactional outbox (DESIGN.md, mechanism 2).

A Celery message that a database change makes necessary is written as an ``outbox``
row in the same transaction. After the commit (:func:`app.store.db.after_commit`), the
batch is sent and its rows deleted; if the broker is down or the process dies first,
the beat's relay (:func:`relay_due`) sends them later. A message may therefore be sent
twice, never zero times: the step runner's fencing makes a duplicate harmless.

A step message is routed when it is sent: to the queue of the agent version its task is
pinned to then (:func:`app.store.messages.step_queue`), read from the task row in the
same statement that reads the row, so a task migrated to a new version has its next
step sent to the new version's queue.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from celery import current_app as celery_app
from sqlalchemy.engine import Connection

from app.store import db, messages

log = logging.getLogger(__name__)

# The relay leaves rows younger than this to the fast path that wrote them.
RELAY_GRACE_SECONDS = 2.0

# Key in the transaction's data under which this transaction's messages are collected.
_BATCH_KEY = "outbox"


class PendingMessage(NamedTuple):
    outbox_id: int
    task_name: str
    queue: str
    args: list[Any]
    agent: str | None = None  # the task's agent, for a readable name in Flower
    version: str | None = None  # the task's agent version: the step's queue


def add(
    conn: Connection,
    task_name: str,
    args: Sequence[Any],
    *,
    queue: str,
    task_id: str | None = None,
) -> int:
    """Queue a Celery message to be published once this transaction commits (``conn``
    must come from :func:`app.store.db.transaction`)."""
    tx = db.state(conn)
    args = list(args)
    outbox_id, agent, version = conn.execute(
        sa.text(
            "INSERT INTO outbox (task_name, queue, args, task_id) "
            "VALUES (:name, :queue, CAST(:args AS jsonb), :task_id) "
            "RETURNING id, (SELECT agent FROM tasks WHERE tasks.id = outbox.task_id), "
            "(SELECT agent_version FROM tasks WHERE tasks.id = outbox.task_id)"
        ),
        {"name": task_name, "queue": queue, "args": json.dumps(args), "task_id": task_id},
    ).one()
    batch = tx.data.get(_BATCH_KEY)
    if batch is None:
        batch = tx.data[_BATCH_KEY] = []
        db.after_commit(conn, publish, batch)
    batch.append(PendingMessage(outbox_id, task_name, queue, args, agent, version))
    return outbox_id


def add_step(conn: Connection, task_id: str, step: int) -> int:
    """Queue the message that runs step ``step`` of ``task_id``."""
    return add(
        conn, messages.RUN_STEP, [task_id, step], queue=messages.STEPS_QUEUE, task_id=task_id
    )


def add_delivery(conn: Connection, delivery_id: str) -> int:
    """Queue the message that makes an attempt of webhook delivery ``delivery_id``."""
    return add(conn, messages.DELIVER_WEBHOOK, [delivery_id], queue=messages.WEBHOOKS_QUEUE)


def route(task_name: str, queue: str, agent: str | None, version: str | None) -> str:
    """The queue a message goes to: a step to its agent version's queue."""
    if task_name == messages.RUN_STEP and agent and version:
        return messages.step_queue(agent, version)
    return queue


def _send(
    task_name: str,
    queue: str,
    args: list[Any],
    agent: str | None = None,
    version: str | None = None,
) -> None:
    # ignore_result: no result-backend subscription per message (it would leak in the web
    # process, and with Redis down it retries for ~20 s before the publish even starts).
    celery_app.send_task(
        task_name,
        args=args,
        queue=route(task_name, queue, agent, version),
        ignore_result=True,
        **messages.message_labels(task_name, args, agent, version),
    )


def publish(batch: Iterable[PendingMessage]) -> int:
    """Send committed outbox messages now and delete their rows; returns how many went.

    Failures are logged, never raised: the relay sends what is left. A message the relay
    also sends (it waits RELAY_GRACE_SECONDS first) is a harmless duplicate.
    """
    sent: list[int] = []
    for message in batch:
        try:
            _send(message.task_name, message.queue, message.args, message.agent, message.version)
        except Exception as exc:  # broker down: the relay retries
            log.warning("outbox publish deferred to the relay: %s", exc)
            break
        sent.append(message.outbox_id)
    if sent:
        try:
            with db.transaction() as conn:
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
                "SELECT o.id, o.task_name, o.queue, o.args, t.agent, t.agent_version "
                "FROM outbox o LEFT JOIN tasks t ON t.id = o.task_id "
                "WHERE o.created_at < now() - make_interval(secs => :grace) "
                "ORDER BY o.id LIMIT :limit FOR UPDATE OF o SKIP LOCKED"
            ),
            {"grace": RELAY_GRACE_SECONDS, "limit": limit},
        ).all()
        sent = []
        for row in rows:
            try:
                _send(row.task_name, row.queue, row.args, row.agent, row.agent_version)
            except Exception as exc:
                log.warning("outbox relay: broker unavailable, %d rows wait: %s", len(rows), exc)
                break
            sent.append(row.id)
        if sent:
            conn.execute(sa.text("DELETE FROM outbox WHERE id = ANY(:ids)"), {"ids": sent})
    return len(sent)


class Backlog(NamedTuple):
    messages: int  # rows not yet published
    oldest_age_seconds: float  # age of the oldest one (0 when empty)


def backlog() -> Backlog:
    """How far the outbox is behind (a metric)."""
    with db.engine().connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT count(*) AS backlog, "
                "COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0) AS oldest "
                "FROM outbox"
            )
        ).one()
    return Backlog(int(row.backlog), float(row.oldest))
