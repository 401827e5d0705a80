"""What a step costs PostgreSQL: its pieces alone, and the tasks table's indexes.

``python -m bench.step_floor`` (``DATABASE_URL`` when set, else an embedded server in a
temporary folder) measures the CPU time of the PostgreSQL backend, read from
``/proc/<pid>/stat``, so other load on the machine changes the wall times it prints
but hardly the CPU times:

1. **pieces**: each statement shape of a step alone, committed each time, on small
   tables of its own: an empty transaction, a narrow ``UPDATE``, the same with a
   ``pg_notify``, an ``INSERT`` of an event carrying a task snapshot, an ``INSERT`` of a
   checkpoint, and the three writes in one transaction. It says what a commit costs
   beside a statement.
2. **indexes**: Outlast's own lease and checkpoint (``lifecycle.acquire_lease`` and
   ``lifecycle.commit_step``, with progress, as an echo step calls them; no outbox, no
   Celery) for 50 tasks x 40 steps on a migrated schema, then again without the four
   indexes on columns every step changes (``lease_expires_at``, ``dispatched_at``,
   ``wake_at``, ``updated_at`` of waiting parents), with fillfactor 50, so that the
   updates can be HOT (no index entry written). It prints the share of HOT updates.

Each part runs in a database it creates and drops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The task as an event carries it (representation.event_task_json), as an echo step's
# events do: about 600 bytes.
SNAPSHOT = json.dumps(
    {
        "task": {
            "id": "tsk_01jexampleexampleexample00",
            "object": "task",
            "agent": "echo",
            "status": "working",
            "metadata": {},
            "step": 3,
            "progress": {"done": 3, "total": 20},
            "result": None,
            "error": None,
            "input_request": None,
            "attempt": 1,
            "webhook_url": None,
            "created_at": "2026-12-07T15:00:00.000Z",
            "updated_at": "2026-12-07T15:00:00.000Z",
            "started_at": "2026-12-07T15:00:00.000Z",
            "finished_at": None,
            "usage": {"model_calls": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0},
            "budget": None,
            "agent_version": "1",
            "acknowledged_at": None,
            "compensation": None,
            "parent_id": None,
        }
    }
)

VOLATILE_INDEXES = ("tasks_lease_expiry", "tasks_dispatched", "tasks_wake", "tasks_waiting")


def backend_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these PostgreSQL backends (they run on this machine)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Scratch:
    """A database of its own on the server at ``base_url`` (created, then dropped)."""

    def __init__(self, base_url: str, name: str):
        self.admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
        self.name = name
        url = sa.make_url(base_url).set(database=name)
        self.url = url.render_as_string(hide_password=False)
        # psycopg2.connect's spelling of it (no "+psycopg2" driver suffix)
        self.libpq_url = url.set(drivername="postgresql").render_as_string(hide_password=False)

    def __enter__(self) -> Scratch:
        with self.admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name}"))
            c.execute(sa.text(f"CREATE DATABASE {self.name}"))
        return self

    def __exit__(self, *exc: object) -> None:
        with self.admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
        self.admin.dispose()

    def serve_outlast(self, tenant_id: str, **env: str) -> None:
        """Point this process's Outlast at the database (``env``: more settings), migrate
        it, and create tenant ``tenant_id``."""
        from app import settings
        from app.store import db

        settings.configure(
            settings.Settings.from_env({**os.environ, **env, "DATABASE_URL": self.url})
        )
        db.upgrade(self.url)
        with db.transaction() as conn:
            conn.execute(
                sa.text("INSERT INTO tenants (id, name) VALUES (:t, :t)"), {"t": tenant_id}
            )

    def backends(self) -> list[int]:
        with self.admin.connect() as c:
            rows = c.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": self.name}
            )
            return [r[0] for r in rows]


def pieces(base_url: str, n: int) -> None:
    with Scratch(base_url, "outlast_floor_pieces") as scratch:
        conn = psycopg2.connect(scratch.libpq_url)
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        cur.execute(
            "CREATE TABLE t (id int PRIMARY KEY, a int, b timestamptz);"
            "CREATE TABLE ev (task_id int, seq int, data jsonb, PRIMARY KEY (task_id, seq));"
            "CREATE TABLE ck (task_id int, step int, state jsonb, PRIMARY KEY (task_id, step));"
            "INSERT INTO t SELECT g, 0, now() FROM generate_series(1, 50) g"
        )
        conn.commit()
        print(
            f"\n## pieces ({n} each, committed each time; event snapshot {len(SNAPSHOT)} bytes)\n"
        )
        print("| piece | backend CPU us | wall us |\n|---|---:|---:|")
        seq = iter(range(10**9))

        def update(i):
            cur.execute("UPDATE t SET a = a + 1, b = now() WHERE id = %s", (i % 50 + 1,))

        def event(i):
            cur.execute(
                "INSERT INTO ev VALUES (%s, %s, CAST(%s AS jsonb))", (i % 50, next(seq), SNAPSHOT)
            )

        def checkpoint(i):
            cur.execute(
                "INSERT INTO ck VALUES (%s, %s, CAST(%s AS jsonb))",
                (i % 50, next(seq), json.dumps({"n": i})),
            )

        shapes = [
            ("empty transaction (SELECT 1, COMMIT)", lambda i: cur.execute("SELECT 1")),
            ("narrow UPDATE, COMMIT", update),
            (
                "narrow UPDATE + pg_notify, COMMIT",
                lambda i: cur.execute(
                    "UPDATE t SET a = a + 1 WHERE id = %s RETURNING pg_notify('c', id::text)",
                    (i % 50 + 1,),
                ),
            ),
            ("INSERT event with the task snapshot, COMMIT", event),
            ("INSERT checkpoint, COMMIT", checkpoint),
            (
                "UPDATE + event + checkpoint, one COMMIT",
                lambda i: (update(i), event(i), checkpoint(i)),
            ),
        ]
        for label, run in shapes:
            cpu0, t0 = backend_cpu([pid]), time.perf_counter()
            for i in range(n):
                run(i)
                conn.commit()
            cpu, wall = backend_cpu([pid]) - cpu0, time.perf_counter() - t0
            print(f"| {label} | {cpu / n * 1e6:.0f} | {wall / n * 1e6:.0f} |", flush=True)
        conn.close()


def echo_tasks(tenant_id: str, count: int, agent_input: dict) -> list[str]:
    """``count`` pending echo tasks of ``tenant_id``, written as a submission writes them
    (``lifecycle.create``), with no step message sent: the caller runs their steps."""
    from app.store import db, lifecycle

    with db.transaction() as conn:
        return [
            lifecycle.create(
                conn,
                tenant_id=tenant_id,
                agent="echo",
                input=agent_input,
                metadata={},
                webhook_url=None,
                timeout_seconds=None,
                idempotency_key=None,
            )["id"]
            for _ in range(count)
        ]


def indexes(base_url: str, tasks: int, steps: int) -> None:
    with Scratch(base_url, "outlast_floor_indexes") as scratch:
        from app.store import db, ids, lifecycle

        scratch.serve_outlast("floor")
        print(f"\n## indexes ({tasks} tasks x {steps} steps: lease + checkpoint with progress)\n")
        print(
            "| tasks table | backend CPU ms/step | wall ms/step | HOT updates |\n|---|---:|---:|---:|"
        )

        def hot_counts() -> tuple[int, int]:
            with db.engine().connect() as c:
                return c.execute(
                    sa.text(
                        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                        "WHERE relname = 'tasks'"
                    )
                ).one()

        def run(label: str, n_tasks: int, n_steps: int) -> None:
            task_ids = echo_tasks("floor", n_tasks, {"message": "x" * 100})
            updates0, hot0 = hot_counts()
            cpu0, t0 = backend_cpu(scratch.backends()), time.perf_counter()
            for step in range(n_steps):
                for task_id in task_ids:
                    token = ids.new_token()
                    with db.transaction() as conn:
                        lifecycle.acquire_lease(conn, task_id, step, token, 30)
                    with db.transaction() as conn:
                        lifecycle.commit_step(
                            conn,
                            task_id,
                            step,
                            token,
                            state={"n": step},
                            started_at=datetime.now(UTC),
                            attempt=1,
                            progress={"done": step},
                        )
            cpu = backend_cpu(scratch.backends()) - cpu0
            wall = time.perf_counter() - t0
            time.sleep(0.7)  # the statistics collector's delay
            updates1, hot1 = hot_counts()
            count = n_tasks * n_steps
            hot = (hot1 - hot0) / max(1, updates1 - updates0)
            if label:
                print(
                    f"| {label} | {cpu / count * 1e3:.3f} | {wall / count * 1e3:.2f} | {hot:.0%} |",
                    flush=True,
                )

        run("", 10, 10)  # warm-up: connections, caches
        run("as migrated", tasks, steps)
        with db.transaction() as conn:
            for index in VOLATILE_INDEXES:
                conn.execute(sa.text(f"DROP INDEX {index}"))
            conn.execute(sa.text("ALTER TABLE tasks SET (fillfactor = 50)"))
        run(f"without {', '.join(VOLATILE_INDEXES)}; fillfactor 50", tasks, steps)
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_floor", description=__doc__)
    parser.add_argument("--what", default="pieces,indexes")
    parser.add_argument("--n", type=int, default=3000, help="repetitions of each piece")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    what = set(args.what.split(","))
    url = os.environ.get("DATABASE_URL")
    server = None
    if not url:
        from app.dev.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="outlast-floor-")) / "pg")
        url = server.start()
    try:
        if "pieces" in what:
            pieces(url, args.n)
        if "indexes" in what:
            indexes(url, args.tasks, args.steps)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
