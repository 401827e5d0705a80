"""The status watcher: polls every task while a fault test runs and records every
observation that breaks the state machine of API.md.

Two views are watched, each on its own (a late answer from one view is not compared
with a fresh read of the other):

- the database: every row of ``tasks``, every ``interval`` seconds (what any API
  answer is built from);
- the API: ``GET /v1/tasks/{id}`` for each task the test submitted (what a client
  sees).

Rules checked between consecutive observations of one task in one view:

- the status only moves along the state machine (a skipped intermediate state is
  fine: polling can miss one); ``working`` → ``pending`` is a regression;
- a terminal task never changes again: not its status, result, error, step or
  ``finished_at``;
- ``step`` and ``attempt`` never decrease.

Errors while polling (the database or the API is down on purpose) are counted, not
raised. :meth:`StatusWatcher.stop` returns; :meth:`StatusWatcher.assert_clean` fails the
test with every violation seen.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import requests
import sqlalchemy as sa

TERMINAL = frozenset({"completed", "failed", "cancelled"})

# Observable moves (transitive closure of API.md's state machine, so that a poll that
# missed the state in between is not a violation). Staying put is always fine.
ALLOWED: dict[str, frozenset[str]] = {
    "pending": frozenset({"working", "input_required", "compensating"} | TERMINAL),
    "working": frozenset({"input_required", "compensating"} | TERMINAL),
    # POST /input answers "status pending or working".
    "input_required": frozenset({"pending", "working", "compensating"} | TERMINAL),
    # V2.md 2: undoing completed calls, on the way to failed or cancelled only.
    "compensating": frozenset({"failed", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

FROZEN_WHEN_TERMINAL = ("status", "result", "error", "step", "finished_at")


@dataclasses.dataclass
class Snapshot:
    status: str
    step: int
    attempt: int
    result: Any
    error: Any
    finished_at: Any

    @classmethod
    def from_task(cls, task: dict[str, Any]) -> Snapshot:
        return cls(
            task["status"],
            task["step"],
            task["attempt"],
            task.get("result"),
            task.get("error"),
            task.get("finished_at"),
        )


def violations_between(before: Snapshot, after: Snapshot) -> list[str]:
    """What is wrong with seeing ``after`` following ``before`` for one task."""
    found = []
    if before.status in TERMINAL:
        for field in FROZEN_WHEN_TERMINAL:
            if getattr(before, field) != getattr(after, field):
                found.append(
                    f"terminal task changed {field}: "
                    f"{getattr(before, field)!r} -> {getattr(after, field)!r}"
                )
    elif after.status != before.status and after.status not in ALLOWED[before.status]:
        found.append(f"status moved backwards: {before.status} -> {after.status}")
    if after.step < before.step:
        found.append(f"step decreased: {before.step} -> {after.step}")
    if after.attempt < before.attempt:
        found.append(f"attempt decreased: {before.attempt} -> {after.attempt}")
    return found


class _View:
    """The last snapshot of each task in one view, and what went wrong."""

    def __init__(self, name: str):
        self.name = name
        self.last: dict[str, Snapshot] = {}
        self.history: dict[str, list[str]] = {}
        self.violations: list[str] = []
        self.polls = 0
        self.errors = 0

    def observe(self, task_id: str, snap: Snapshot) -> None:
        before = self.last.get(task_id)
        if before is not None:
            for problem in violations_between(before, snap):
                self.violations.append(
                    f"[{self.name}] {task_id}: {problem} (seen: {self.history[task_id]})"
                )
        if before is None or before.status != snap.status:
            self.history.setdefault(task_id, []).append(snap.status)
        self.last[task_id] = snap


class StatusWatcher:
    """Polls every task of one database (and, when given, the API) in a thread."""

    def __init__(self, interval: float = 0.1, api_interval: float = 0.25):
        self.interval = interval
        self.api_interval = api_interval
        self.db = _View("database")
        self.api = _View("api")
        self._engine: sa.Engine | None = None
        self._base_url: str | None = None
        self._api_key: str | None = None
        self._tracked: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(
        self, database_url: str, base_url: str | None = None, api_key: str | None = None
    ) -> StatusWatcher:
        """Start polling ``database_url`` (and ``base_url`` for tracked tasks)."""
        self._engine = sa.create_engine(
            database_url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2}
        )
        self._base_url = base_url
        self._api_key = api_key
        # The first read before start() returns: a test shorter than the thread's first
        # poll (on a slow machine) would otherwise end with none, its database dropped.
        self._poll_database()
        self._thread = threading.Thread(target=self._run, name="status-watcher", daemon=True)
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread is not None

    def track(self, task_id: str) -> None:
        """Also poll this task through the API."""
        with self._lock:
            if task_id not in self._tracked:
                self._tracked.append(task_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._engine is not None:
            self._engine.dispose()

    def violations(self) -> list[str]:
        return self.db.violations + self.api.violations

    def assert_clean(self) -> None:
        """Fail with every violation seen; also fail if the watcher saw nothing at all."""
        problems = self.violations()
        assert not problems, "status watcher saw violations:\n" + "\n".join(problems)
        assert self.db.polls > 0, "status watcher never read the database"

    def summary(self) -> str:
        return (
            f"watcher: db {self.db.polls} polls / {self.db.errors} errors / "
            f"{len(self.db.last)} tasks; api {self.api.polls} polls / {self.api.errors} errors"
        )

    # --- the polling thread ---------------------------------------------------------------

    def _run(self) -> None:
        session = requests.Session()
        if self._api_key:
            session.headers["Authorization"] = f"Bearer {self._api_key}"
        next_api = 0.0
        while not self._stop.is_set():
            self._poll_database()
            if self._base_url and time.monotonic() >= next_api:
                self._poll_api(session)
                next_api = time.monotonic() + self.api_interval
            self._stop.wait(self.interval)
        session.close()

    def _poll_database(self) -> None:
        assert self._engine is not None
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT id, status::text AS status, step, attempt, result, error, "
                        "finished_at FROM tasks"
                    )
                ).mappings()
                for row in rows:
                    self.db.observe(row["id"], Snapshot.from_task(dict(row)))
            self.db.polls += 1
        except Exception:  # the database is down on purpose in some tests
            self.db.errors += 1
            self._stop.wait(0.2)

    def _poll_api(self, session: requests.Session) -> None:
        with self._lock:
            tracked = list(self._tracked)
        for task_id in tracked:
            try:
                response = session.get(f"{self._base_url}/v1/tasks/{task_id}", timeout=3)
            except requests.RequestException:
                self.api.errors += 1
                continue
            if response.status_code != 200:
                self.api.errors += 1
                continue
            self.api.observe(task_id, Snapshot.from_task(response.json()))
            self.api.polls += 1
