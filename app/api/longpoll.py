"""Waiting for a task to change without holding a database connection.

Every task-changing transaction sends ``NOTIFY outlast_task, '<task id>'`` (in
:func:`app.store.lifecycle.append_event`), delivered at commit. Each web process keeps ONE
dedicated ``LISTEN`` connection, read by a daemon thread that wakes the requests waiting
on that task id (:class:`TaskNotifications`). A waiting request (``?wait=N`` long poll,
SSE stream) therefore holds no pooled connection: it reads the database briefly after
each wake-up. Under gunicorn's gevent worker (``outlast web``'s default) the listener
"thread" and every waiter are greenlets (gevent patches ``threading`` and ``select``, and
psycogreen makes psycopg2 wait through gevent), so a waiter costs memory, not a request
thread. Each waiter also holds one of its tenant's slots (:func:`app.api.limits.acquire_waiter`,
``OUTLAST_MAX_WAITERS_PER_TENANT`` across web processes).

:func:`wait_for` is the one waiting loop: ``GET /v1/tasks/{id}?wait=N`` uses it, and so
can any other request that waits for a task to change (``Prefer: wait=N``).

The listener is lazy (started by the first waiter, again after a fork) and follows the
configured ``DATABASE_URL``. While it is not connected, waiters fall back to re-reading
every :data:`FALLBACK_POLL_SECONDS`; each (re)connection wakes every waiter, so a change
committed while nobody listened is never missed.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from app.api import limits
from app.store import db
from app.store.lifecycle import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

FALLBACK_POLL_SECONDS = 1.0
# How often the listener thread looks at its connection and the configured URL.
LISTENER_TICK_SECONDS = 1.0
RECONNECT_DELAY_MAX_SECONDS = 5.0


class Waiter:
    """One waiting request: set when its task is notified (or on a reconnection)."""

    def __init__(self, task_id: str, notifications: TaskNotifications):
        self.task_id = task_id
        self._notifications = notifications
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Block at most ``timeout`` seconds (at most FALLBACK_POLL_SECONDS while the
        listener is down); ``True`` when woken. Re-read the task either way."""
        if not self._notifications.connected:
            timeout = min(timeout, FALLBACK_POLL_SECONDS)
        woken = self._event.wait(max(timeout, 0.0))
        self._event.clear()
        return woken


class TaskNotifications:
    """The process's LISTEN connection and the waiters it wakes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._listening_url: str | None = None
        # A pipe that interrupts the listener's select() when DATABASE_URL changed.
        self._nudge: tuple[int, int] | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @contextmanager
    def watch(self, task_id: str) -> Iterator[Waiter]:
        """Register a waiter for ``task_id`` for the duration of the block. Read the
        task *after* entering it, so that no change can slip in between."""
        self._ensure_listener()
        waiter = Waiter(task_id, self)
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(task_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[task_id]

    def waiting(self) -> int:
        """How many requests are waiting right now (a gauge)."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def _wake(self, task_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(task_id, ()))
        for waiter in waiters:
            waiter.wake()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [w for ws in self._waiters.values() for w in ws]
        for waiter in waiters:
            waiter.wake()

    def _ensure_listener(self) -> None:
        from app import settings as settings_mod

        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            if self._listening_url != settings_mod.current().database_url and self._nudge:
                # Reconfigured (tests, `outlast up`): follow the new database now.
                os.write(self._nudge[1], b"!")
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            if self._pid != os.getpid():  # forked: the parent's thread does not exist here
                self._connected.clear()
                self._nudge = None  # the inherited pipe is the parent's
            if self._nudge is None:
                self._nudge = os.pipe()
                os.set_blocking(self._nudge[0], False)
                os.set_blocking(self._nudge[1], False)
            self._pid = os.getpid()
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="outlast-task-listener", daemon=True
            )
            self._thread.start()

    def _connect(self, url: str):
        import psycopg2
        import sqlalchemy as sa

        sa_url = sa.engine.make_url(url)
        _, params = db.engine().dialect.create_connect_args(sa_url)
        conn = psycopg2.connect(
            **params,
            connect_timeout=5,
            application_name="outlast-listen",
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return conn

    def _run(self) -> None:
        from app import settings as settings_mod

        delay = 0.2
        while not self._stop.is_set():
            url = settings_mod.current().database_url
            conn = None
            try:
                conn = self._connect(settings_mod.current().require_database_url())
                self._listening_url = url
                self._connected.set()
                delay = 0.2
                # Anything committed before LISTEN took effect: every waiter re-reads.
                self._wake_all()
                while not self._stop.is_set():
                    if settings_mod.current().database_url != url:
                        break  # reconfigured (tests, `outlast up`): follow the new database
                    nudge = self._nudge[0]
                    readable, _, _ = select.select([conn, nudge], [], [], LISTENER_TICK_SECONDS)
                    if nudge in readable:
                        try:
                            os.read(nudge, 4096)
                        except BlockingIOError:
                            pass
                    if conn not in readable:
                        continue
                    conn.poll()
                    while conn.notifies:
                        self._wake(conn.notifies.pop(0).payload)
            except Exception as exc:  # database down or connection lost: retry with backoff
                log.warning("task listener disconnected, retrying in %.1fs: %s", delay, exc)
            finally:
                self._listening_url = None
                self._connected.clear()
                self._wake_all()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            # Back off while the same database stays unreachable; a new DATABASE_URL
            # (tests, `outlast up`) is tried at once.
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and settings_mod.current().database_url == url:
                if self._stop.wait(min(0.2, delay)):
                    return
            delay = min(delay * 2, RECONNECT_DELAY_MAX_SECONDS)
            if settings_mod.current().database_url != url:
                delay = 0.2


notifications = TaskNotifications()


T = TypeVar("T")


def wait_for(
    task_id: str,
    tenant_id: str,
    read: Callable[[], T],
    settled: Callable[[T], bool],
    timeout: float,
    slot: limits.WaiterSlot | None = None,
) -> T:
    """``read()`` again after each change of ``task_id`` until ``settled(value)`` or
    ``timeout`` seconds passed; the last value read.

    Holds one of the tenant's waiter slots meanwhile (``slot`` if the caller took one
    already, else one taken here: :class:`~app.errors.RateLimited` when the tenant has
    ``OUTLAST_MAX_WAITERS_PER_TENANT`` waiters; a caller that has already done its work,
    as a submission with ``Prefer: wait``, may take the slot first with
    :func:`app.api.limits.acquire_waiter`, or catch the 429 and answer without waiting).
    The first ``read()`` happens after the watch is registered, so no change is missed.
    """
    deadline = time.monotonic() + timeout
    own_slot = slot is None
    if slot is None:
        slot = limits.acquire_waiter(tenant_id)
    try:
        with notifications.watch(task_id) as waiter:
            value = read()
            while not settled(value):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                woken = waiter.wait(min(remaining, limits.WAITER_RENEW_SECONDS))
                slot.renew()
                if woken or not notifications.connected:  # a quiet wake-up reads nothing
                    value = read()
            return value
    finally:
        if own_slot:
            slot.release()
