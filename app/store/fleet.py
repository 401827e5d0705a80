"""The workers that are running and the agent versions each can take (V2.md section 7).

Every step worker advertises itself with a row in ``worker_heartbeats``: the
``(agent, version)`` pairs its registry can run or migrate from, refreshed every
:func:`heartbeat_interval` seconds and counted as live for :data:`MISSED_BEATS` of them.
A worker that stops cleanly deletes its row at once; a killed one stops counting when
its ``live_until`` passes. ``GET /v1/agents`` (live workers per version), the
``outlast_tasks_stranded`` metric and the per-version counts of tasks in flight read
from here.

Why a row rather than Celery's worker inspection: a broadcast waits a fixed reply
timeout on every call and sees only workers that answer in time, while a row is one
indexed query from any web process, works with the broker down, and says exactly what
the worker's registry holds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app import settings as settings_mod

log = logging.getLogger(__name__)

# A worker counts as live until it misses this many heartbeats in a row.
MISSED_BEATS = 3
# Rows of workers dead for this long are deleted by the other workers' heartbeats.
FORGET_DEAD_AFTER_SECONDS = 86400

# Tasks that are not terminal yet (the predicate of the tasks_in_flight_version index).
IN_FLIGHT = "status NOT IN ('completed', 'failed', 'cancelled')"

Handles = dict[tuple[str, str], int]


def heartbeat_interval(cfg: settings_mod.Settings) -> float:
    """Seconds between heartbeats: the reaper interval, within 0.5 to 10 s."""
    return min(10.0, max(0.5, cfg.reaper_interval_seconds))


def beat(
    conn: Connection,
    worker_id: str,
    handles: Sequence[tuple[str, str]],
    live_seconds: float,
) -> None:
    """Insert or refresh ``worker_id``'s row: it can take ``handles`` for ``live_seconds``."""
    conn.execute(
        sa.text(
            "INSERT INTO worker_heartbeats (worker_id, hostname, pid, handles, live_until) "
            "VALUES (:id, :host, :pid, CAST(:handles AS jsonb), "
            "        now() + make_interval(secs => :live)) "
            "ON CONFLICT (worker_id) DO UPDATE SET handles = EXCLUDED.handles, "
            "seen_at = now(), live_until = EXCLUDED.live_until"
        ),
        {
            "id": worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "handles": json.dumps([list(pair) for pair in handles]),
            "live": live_seconds,
        },
    )
    conn.execute(
        sa.text(
            "DELETE FROM worker_heartbeats "
            "WHERE live_until < now() - make_interval(secs => :forget)"
        ),
        {"forget": FORGET_DEAD_AFTER_SECONDS},
    )


def forget(conn: Connection, worker_id: str) -> None:
    """The worker stopped: it takes nothing any more."""
    conn.execute(sa.text("DELETE FROM worker_heartbeats WHERE worker_id = :id"), {"id": worker_id})


def live_workers(conn: Connection) -> Handles:
    """``{(agent, version): live workers that can run or migrate from it}``."""
    rows = conn.execute(
        sa.text(
            "SELECT h->>0 AS agent, h->>1 AS version, count(*) AS workers "
            "FROM worker_heartbeats w CROSS JOIN LATERAL jsonb_array_elements(w.handles) h "
            "WHERE w.live_until > now() GROUP BY 1, 2"
        )
    ).all()
    return {(r.agent, r.version): int(r.workers) for r in rows}


def tasks_in_flight(conn: Connection, tenant_id: str | None = None) -> Handles:
    """``{(agent, version): tasks not yet terminal}``, of one tenant or of all."""
    where = f"WHERE {IN_FLIGHT}" + (" AND tenant_id = :tenant_id" if tenant_id else "")
    rows = conn.execute(
        sa.text(
            f"SELECT agent, agent_version, count(*) AS n FROM tasks {where} "
            "GROUP BY agent, agent_version"
        ),
        {"tenant_id": tenant_id},
    ).all()
    return {(r.agent, r.agent_version): int(r.n) for r in rows}


def stranded(in_flight: Handles, workers: Handles) -> Handles:
    """The tasks in flight on versions that no live worker can run or migrate from."""
    return {pair: n for pair, n in in_flight.items() if n and not workers.get(pair)}


class Heartbeat:
    """A thread that keeps one worker's row fresh, in the worker's main process.

    It uses an engine of its own without a pool: the worker's pool children are forked
    from this process, and must never inherit a pooled connection (or a pool lock) that
    this thread holds at that moment.
    """

    def __init__(
        self,
        worker_id: str,
        handles: Iterable[tuple[str, str]],
        running: Callable[[], bool] = lambda: True,
    ):
        self.worker_id = worker_id
        self.running = running  # False once the worker stopped without telling us
        self.handles = list(handles)
        cfg = settings_mod.current()
        self.interval = heartbeat_interval(cfg)
        self._engine = sa.create_engine(
            cfg.require_database_url(),
            poolclass=sa.pool.NullPool,
            connect_args={"connect_timeout": 5, "application_name": "outlast-heartbeat"},
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outlast-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()  # advertised before the first message is taken
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            with self._engine.begin() as conn:
                beat(conn, self.worker_id, self.handles, self.interval * MISSED_BEATS)
        except Exception as exc:  # a database outage: the next beat tries again
            log.warning("worker heartbeat not written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.running():
                self._forget()
                return
            self._beat()

    def stop(self) -> None:
        """Stop beating and delete the row (the worker no longer takes anything)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 5)
        self._forget()

    def _forget(self) -> None:
        try:
            with self._engine.begin() as conn:
                forget(conn, self.worker_id)
        except Exception as exc:
            log.warning("worker heartbeat not removed (it expires by itself): %s", exc)
        self._engine.dispose()
