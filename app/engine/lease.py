"""A step's lease, kept alive from a background thread while the step runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from app.store import db, lifecycle

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps a step's lease alive from a background thread, renewing every lease/3.

    It is also the step's cancellation signal: a renewal that matches no row (the task
    was cancelled, failed or reaped) marks the lease lost, and a passed deadline fails
    the task with ``timeout`` at once, fenced on the lease.
    """

    def __init__(
        self, task_id: str, token: str, lease_seconds: float, deadline_at: datetime | None
    ):
        self.task_id = task_id
        self.token = token
        self.lease_seconds = lease_seconds
        self.deadline_at = deadline_at
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{task_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = max(0.1, self.lease_seconds / 3)
        while not self._stop.wait(interval):
            try:
                if self.deadline_passed():
                    with db.transaction() as conn:  # publishes the webhook delivery at once
                        lifecycle.fail_timeout(conn, self.task_id, token=self.token)
                    self.lost.set()
                    return
                with db.transaction() as conn:
                    if not lifecycle.renew_lease(
                        conn, self.task_id, self.token, self.lease_seconds
                    ):
                        self.lost.set()
                        return
            except Exception as exc:  # the database may be back before the lease runs out
                log.warning("lease renewal of %s failed: %s", self.task_id, exc)

    def deadline_passed(self) -> bool:
        return self.deadline_at is not None and datetime.now(UTC) >= self.deadline_at

    def held(self) -> bool:
        """Checks the database: is the task still ``working`` under this lease, and has
        the lease not expired? (A worker paused past its lease must not go on making
        calls even before the reaper notices: another execution may be running.)"""
        if self.lost.is_set():
            return False
        if self.deadline_passed():
            return False
        with db.engine().connect() as conn:
            still = conn.execute(
                sa.text(
                    "SELECT 1 FROM tasks WHERE id = :id AND lease_token = :token "
                    "AND status = 'working' AND lease_expires_at > now()"
                ),
                {"id": self.task_id, "token": self.token},
            ).first()
        if still is None:
            self.lost.set()
        return still is not None

    def report_progress(self, progress: Mapping[str, Any]) -> bool:
        with db.transaction() as conn:
            row = lifecycle.report_progress(conn, self.task_id, self.token, progress)
        if row is None:
            self.lost.set()
        return row is not None
