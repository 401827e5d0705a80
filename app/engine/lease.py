"""A step's lease, kept alive by one renewal thread per process while the step runs.

Every lease a process holds is renewed by the same long-lived thread (:class:`Renewer`),
all due leases in one ``UPDATE``: starting and joining a thread per step cost about a
tenth of a short step's wall time. The renewer also writes a step's reported progress
that the step's own checkpoint did not take in time (see :meth:`LeaseKeeper.report_progress`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from app.store import db, lifecycle

log = logging.getLogger(__name__)

# Reported progress waits at most this long for the step's checkpoint to carry it; then
# the renewer writes it in a transaction of its own (a step that reports progress and
# then computes for minutes still shows it).
PROGRESS_FLUSH_SECONDS = 1.0

# One statement renews every due lease of this process; a lease renewed when it did not
# match (cancelled, failed, reaped, finished) is lost. Same fence as a single renewal:
# the token and the status the lease was taken in (``working``, or ``compensating`` for
# an undo step).
_RENEW_LEASES = sa.text(
    "UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => l.lease) "
    "FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[]), "
    "CAST(:leases AS double precision[]), CAST(:statuses AS text[])) "
    "AS l(id, token, lease, status) "
    "WHERE t.id = l.id AND t.lease_token = l.token AND t.status::text = l.status "
    "RETURNING t.lease_token"
)


class LeaseKeeper:
    """Keeps a step's lease alive while the step runs (``with keeper:``), renewed every
    lease/3 by this process's :class:`Renewer`.

    It is also the step's cancellation signal: a renewal that matches no row (the task
    was cancelled, failed or reaped) marks the lease lost, and a passed deadline fails
    the task with ``timeout`` at once, fenced on the lease. ``status`` is the status the
    lease is fenced on: ``working`` for a step, ``compensating`` for an undo step (which
    has no deadline and reports no progress).
    """

    def __init__(
        self,
        task_id: str,
        token: str,
        lease_seconds: float,
        deadline_at: datetime | None,
        status: str = "working",
    ):
        self.task_id = task_id
        self.token = token
        self.lease_seconds = lease_seconds
        self.deadline_at = deadline_at
        self.status = status
        self.lost = threading.Event()
        self.interval = max(0.1, lease_seconds / 3)
        self.renew_at = time.monotonic() + self.interval
        # Progress reported and not yet written, with when it was reported; the lock is
        # held while it is written, so the checkpoint and the renewer never both write it.
        self._progress_lock = threading.Lock()
        self._progress: tuple[dict[str, Any], float] | None = None

    def __enter__(self) -> LeaseKeeper:
        renewer().hold(self)
        return self

    def __exit__(self, *exc: object) -> None:
        renewer().release(self)
        self.flush_progress()  # normally nothing is left: the step wrote or dropped it

    def deadline_passed(self) -> bool:
        return self.deadline_at is not None and datetime.now(UTC) >= self.deadline_at

    def held(self) -> bool:
        """Checks the database: is the task still ``working`` under this lease, and has
        the lease not expired? (A worker paused past its lease must not go on making
        calls even before the reaper notices: another execution may be running.)
        Progress reported before is written first, so it precedes whatever comes next."""
        if self.lost.is_set():
            return False
        self.flush_progress()
        if self.lost.is_set() or self.deadline_passed():
            return False
        with db.engine().connect() as conn:
            still = conn.execute(
                sa.text(
                    "SELECT 1 FROM tasks WHERE id = :id AND lease_token = :token "
                    "AND status::text = :status AND lease_expires_at > now()"
                ),
                {"id": self.task_id, "token": self.token, "status": self.status},
            ).first()
        if still is None:
            self.lost.set()
        return still is not None

    # --- progress -----------------------------------------------------------------------

    def report_progress(self, progress: Mapping[str, Any]) -> bool:
        """Note ``progress`` (a ``task.progress`` event, fenced on the lease).

        It is written with the step's checkpoint when the step ends right after (the
        common case: one commit fewer per step), before the step's next tool call or
        wait, or by the renewer after :data:`PROGRESS_FLUSH_SECONDS`; events keep their
        order. ``False`` once the lease is known lost (a previous report's fence failed).
        """
        if self.lost.is_set():
            return False
        with self._progress_lock:
            previous, self._progress = self._progress, (dict(progress), time.monotonic())
            if previous is not None and not self._write_progress(previous[0]):
                self._progress = None
                return False
        renewer().wake()
        return True

    def take_progress(self) -> dict[str, Any] | None:
        """The progress not yet written, for the checkpoint's transaction to write."""
        with self._progress_lock:
            pending, self._progress = self._progress, None
        return pending[0] if pending is not None else None

    def progress_due_at(self) -> float | None:
        pending = self._progress
        return None if pending is None else pending[1] + PROGRESS_FLUSH_SECONDS

    def flush_progress(self) -> None:
        """Write the pending progress in its own transaction now (never raises: a
        progress event that cannot be written is logged, and the step goes on)."""
        if self._progress is None:
            return
        with self._progress_lock:
            pending, self._progress = self._progress, None
            if pending is None:
                return
            try:
                self._write_progress(pending[0])
            except Exception as exc:
                log.warning("progress of %s not recorded: %s", self.task_id, exc)

    def _write_progress(self, progress: Mapping[str, Any]) -> bool:
        with db.transaction() as conn:
            row = lifecycle.report_progress(conn, self.task_id, self.token, progress)
        if row is None:
            self.lost.set()
        return row is not None


class Renewer:
    """The one thread of a process that renews the leases its steps hold.

    Started on the first lease (and again in a forked child, or if it ever died); it
    sleeps until the earliest renewal or pending progress is due. A renewal that fails
    (database unreachable) is tried again at the next interval: the database may be
    back before the lease runs out.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[str, LeaseKeeper] = {}
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def hold(self, keeper: LeaseKeeper) -> None:
        if self._pid != os.getpid():
            # A forked child inherits this object, not the thread nor the parent's leases.
            self._cond = threading.Condition()
            self._held = {}
            self._thread = None
            self._pid = os.getpid()
        with self._cond:
            self._held[keeper.token] = keeper
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def release(self, keeper: LeaseKeeper) -> None:
        with self._cond:
            self._held.pop(keeper.token, None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def holding(self) -> int:
        """How many leases this process holds now (tests, diagnostics)."""
        with self._cond:
            return len(self._held)

    def _next_wake(self, now: float) -> float:
        wake = now + 60.0
        for keeper in self._held.values():
            wake = min(wake, keeper.renew_at)
            due = keeper.progress_due_at()
            if due is not None:
                wake = min(wake, due)
        return wake

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    wake = self._next_wake(now)
                    if wake <= now:
                        break
                    self._cond.wait(wake - now)
                keepers = list(self._held.values())
            try:
                self._tick(keepers, time.monotonic())
            except Exception:  # never let the thread die: every lease depends on it
                log.exception("lease renewal failed")
                time.sleep(0.1)

    def _tick(self, keepers: list[LeaseKeeper], now: float) -> None:
        # Leases due within half an interval go in the same statement.
        due = [k for k in keepers if k.renew_at <= now + k.interval / 2]
        renew = []
        for keeper in due:
            keeper.renew_at = now + keeper.interval
            if keeper.lost.is_set():
                self.release(keeper)
            elif keeper.deadline_passed():
                self._fail_timeout(keeper)
            else:
                renew.append(keeper)
        if renew:
            self._renew(renew)
        for keeper in keepers:
            due_at = keeper.progress_due_at()
            if due_at is not None and due_at <= now and not keeper.lost.is_set():
                keeper.flush_progress()

    def _fail_timeout(self, keeper: LeaseKeeper) -> None:
        try:
            with db.transaction() as conn:  # publishes the webhook delivery at once
                lifecycle.fail_timeout(conn, keeper.task_id, token=keeper.token)
        except Exception as exc:
            log.warning("timeout of %s not recorded yet: %s", keeper.task_id, exc)
            return
        keeper.lost.set()
        self.release(keeper)

    def _renew(self, keepers: list[LeaseKeeper]) -> None:
        try:
            with db.transaction() as conn:
                renewed = set(
                    conn.execute(
                        _RENEW_LEASES,
                        {
                            "ids": [k.task_id for k in keepers],
                            "tokens": [k.token for k in keepers],
                            "leases": [float(k.lease_seconds) for k in keepers],
                            "statuses": [k.status for k in keepers],
                        },
                    ).scalars()
                )
        except Exception as exc:  # the database may be back before the lease runs out
            log.warning(
                "lease renewal of %s failed: %s", ", ".join(k.task_id for k in keepers), exc
            )
            return
        for keeper in keepers:
            if keeper.token not in renewed:
                keeper.lost.set()
                self.release(keeper)


_renewer = Renewer()


def renewer() -> Renewer:
    """This process's lease renewer."""
    return _renewer
