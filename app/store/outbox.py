"""The transactional outbox (DESIGN.md, mechanism 2).

A Celery message that a database change makes necessary is written as an ``outbox``
row in the same transaction. After the commit (:func:`app.store.db.after_commit`), the
batch is sent; if the broker is down or the process dies first, the beat's relay
(:func:`relay_due`) sends them later. A message may therefore be sent twice, never zero
times: the step runner's fencing makes a duplicate harmless.

The rows of sent messages are not deleted in a transaction of their own on the hot
path: their ids wait in this process's :data:`sent_rows`, and are deleted in bulk by the
next transaction of this process that offers to carry them (the step runner's lease:
``DELETE_ROWS_SQL`` in the lease's query string, :func:`app.store.lifecycle.acquire_lease`)
or by a background thread within :data:`SENT_DELETE_SECONDS`, well
inside the relay's grace period. A process that dies with ids still waiting leaves rows
that the relay sends again: a duplicate, fenced like any other.

A step message is routed when it is sent: to the queue of the agent version its task is
pinned to then (:func:`app.store.messages.step_queue`), read from the task row in the
same statement that reads the row, so a task migrated to a new version has its next
step sent to the new version's queue.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from celery import current_app as celery_app
from sqlalchemy.engine import Connection

from app.store import db, messages

log = logging.getLogger(__name__)

# The relay leaves rows younger than this to the fast path that wrote them.
RELAY_GRACE_SECONDS = 2.0

# Ids of sent messages wait at most this long before a background thread deletes their
# rows (when no transaction of this process took them first); far below the grace.
SENT_DELETE_SECONDS = 0.2

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
    also: Sequence[str] = (),
    also_params: Mapping[str, Any] | None = None,
) -> int:
    """Queue a Celery message to be published once this transaction commits (``conn``
    must come from :func:`app.store.db.transaction`).

    ``also``: data-modifying statements (with ``also_params``; ``:task_id`` is this
    row's) run in the same round trip, as ``WITH`` queries of the ``INSERT`` (each runs
    exactly once, to completion, though nothing reads it)."""
    tx = db.state(conn)
    args = list(args)
    outbox_id, agent, version = conn.execute(
        _insert(also),
        {
            **(also_params or {}),
            "name": task_name,
            "queue": queue,
            "args": json.dumps(args),
            "task_id": task_id,
        },
    ).one()
    batch = tx.data.get(_BATCH_KEY)
    if batch is None:
        batch = tx.data[_BATCH_KEY] = []
        db.after_commit(conn, publish, batch)
    batch.append(PendingMessage(outbox_id, task_name, queue, args, agent, version))
    return outbox_id


_INSERT = (
    "INSERT INTO outbox (task_name, queue, args, task_id) "
    "VALUES (:name, :queue, CAST(:args AS jsonb), :task_id) "
    "RETURNING id, (SELECT agent FROM tasks WHERE tasks.id = outbox.task_id), "
    "(SELECT agent_version FROM tasks WHERE tasks.id = outbox.task_id)"
)
_insert_plain = sa.text(_INSERT)


def _insert(also: Sequence[str]) -> sa.TextClause:
    if not also:
        return _insert_plain
    queries = ", ".join(f"also{i} AS ({statement})" for i, statement in enumerate(also))
    return db.text(f"WITH {queries} {_INSERT}")


def add_step(
    conn: Connection,
    task_id: str,
    step: int,
    *,
    also: Sequence[str] = (),
    also_params: Mapping[str, Any] | None = None,
) -> int:
    """Queue the message that runs step ``step`` of ``task_id`` (``also``: see :func:`add`)."""
    return add(
        conn,
        messages.RUN_STEP,
        [task_id, step],
        queue=messages.STEPS_QUEUE,
        task_id=task_id,
        also=also,
        also_params=also_params,
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
    """Send committed outbox messages now; their rows are deleted in bulk soon after
    (:class:`SentRows`). Returns how many went.

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
        sent_rows.add(sent)
    return len(sent)


DELETE_ROWS_SQL = "DELETE FROM outbox WHERE id = ANY(:ids)"
_DELETE_ROWS = sa.text(DELETE_ROWS_SQL)


class SentRows:
    """Ids of outbox rows whose message this process sent, waiting to be deleted.

    Deleting each publish's rows in a transaction of its own cost a commit per step and
    per submission. Here they are deleted by a transaction this process runs anyway
    (a step's lease, with :meth:`take` and :meth:`put_back`), or in bulk by one thread
    after :data:`SENT_DELETE_SECONDS`.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._ids: list[int] = []
        self._database: str | None = None  # whose rows they are
        self._since: float | None = None
        self._thread: threading.Thread | None = None

    def _mine(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's ids are the parent's
            self._reset()

    @staticmethod
    def _current_database() -> str | None:
        from app import settings

        return settings.current().database_url

    def add(self, ids: list[int]) -> None:
        self._mine()
        database = self._current_database()
        with self._cond:
            if database != self._database:  # ids of another database are not ours to delete
                self._ids, self._database = [], database
            self._ids.extend(ids)
            if self._since is None:
                self._since = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="outbox-sent-rows", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def take(self) -> list[int]:
        """The waiting ids, for a transaction on the database they belong to (a process
        whose settings now name another database, as tests do, drops them)."""
        self._mine()
        database = self._current_database()
        with self._cond:
            ids, self._ids, self._since = self._ids, [], None
            if database != self._database:
                return []
        return ids

    def put_back(self, ids: list[int]) -> None:
        """Ids a transaction took and could not commit (they are deleted later)."""
        if ids:
            self.add(ids)

    def waiting(self) -> int:
        with self._cond:
            return len(self._ids)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._since is None:
                    self._cond.wait()
                delay = self._since + SENT_DELETE_SECONDS - time.monotonic()
            if delay > 0:
                time.sleep(delay)
                continue
            self.flush()

    def flush(self) -> None:
        """Delete the waiting rows now (never raises)."""
        ids = self.take()
        if not ids:
            return
        try:
            with db.transaction() as conn:
                conn.execute(_DELETE_ROWS, {"ids": ids})
        except Exception as exc:  # the relay will send them again: duplicates are fenced
            log.warning("%d outbox rows sent but not deleted: %s", len(ids), exc)


sent_rows = SentRows()
atexit.register(sent_rows.flush)


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
