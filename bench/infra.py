"""What the benchmarks run on: PostgreSQL and Redis (embedded, or the given
``DATABASE_URL`` / ``REDIS_URL``), one database and one Redis database per contender,
and real worker subprocesses, all stopped at the end.

Each contender gets its own PostgreSQL database and Redis database number, so a queue
left behind by one can never feed another, and each is flushed before it runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil
import redis as redis_lib
import sqlalchemy as sa

from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from app.dev.processes import ManagedProcess, stop_all
from app.settings import database_url_for_sqlalchemy

ROOT = Path(__file__).resolve().parent.parent

# Redis database numbers: one per contender.
REDIS_DB = {"outlast": 1, "baseline": 2, "variant": 3, "statements": 4}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Infra:
    """The servers, databases and processes of one benchmark run."""

    def __init__(self, keep_logs: bool = False):
        self.tmp = Path(tempfile.mkdtemp(prefix="outlast-bench-"))
        self.log_dir = self.tmp / "logs"
        self.log_dir.mkdir()
        self.keep_logs = keep_logs
        self._pg: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None
        self.processes: list[ManagedProcess] = []
        self.databases: list[str] = []
        self._counts: dict[str, int] = {}
        given_db = os.environ.get("DATABASE_URL")
        given_redis = os.environ.get("REDIS_URL")
        self.embedded = not (given_db and given_redis)
        if given_db:
            self.admin_url = database_url_for_sqlalchemy(given_db)
        else:
            self._pg = EmbeddedPostgres(self.tmp / "postgres")
            self.admin_url = self._pg.start()
        if given_redis:
            self.redis_base = given_redis
        else:
            self._redis = EmbeddedRedis(self.tmp / "redis")
            self.redis_base = self._redis.start()
        self.admin = sa.create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        self.prefix = f"outlast_bench_{os.getpid()}"

    # --- PostgreSQL ---------------------------------------------------------------------

    def url_for(self, database: str) -> str:
        """SQLAlchemy (psycopg2) URL of ``database`` on the benchmark's server."""
        url = sa.engine.make_url(self.admin_url)
        return url.set(database=database).render_as_string(hide_password=False)

    def libpq_url_for(self, database: str) -> str:
        """The same URL without the driver name (for DBOS, which brings psycopg 3)."""
        return self.url_for(database).replace("postgresql+psycopg2://", "postgresql://", 1)

    def create_database(self, name: str) -> str:
        """A fresh database ``<prefix>_<name>``; returns its SQLAlchemy URL."""
        full = f"{self.prefix}_{name}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{full}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{full}"')
        self.databases.append(full)
        return self.url_for(full)

    def database_name(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    # --- Redis ----------------------------------------------------------------------------

    def redis_url(self, contender: str) -> str:
        """The Redis URL (its own database number) of ``contender``."""
        if contender not in REDIS_DB:  # any other stack gets the next free number
            REDIS_DB[contender] = max(REDIS_DB.values()) + 1
        base = self.redis_base.rstrip("/")
        scheme, _, rest = base.partition("://")
        host = rest.split("/", 1)[0]
        return f"{scheme}://{host}/{REDIS_DB[contender]}"

    def flush_redis(self, contender: str) -> None:
        client = redis_lib.Redis.from_url(self.redis_url(contender))
        try:
            client.flushdb()
        finally:
            client.close()

    # --- processes ------------------------------------------------------------------------

    def base_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a benchmark subprocess: this venv first on PATH, no
        DATABASE_URL/REDIS_URL of our own (each contender sets its own)."""
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(
            {
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        return env

    def start(self, name: str, argv: Sequence[str] | str, env: Mapping[str, str]) -> ManagedProcess:
        """Start ``argv`` in its own process group, logging to ``<log dir>/<name>.N.log``."""
        n = self._counts[name] = self._counts.get(name, 0) + 1
        proc = ManagedProcess(
            f"{name}.{n}",
            list(argv) if not isinstance(argv, str) else argv,
            env=env,
            cwd=ROOT,
            log_path=self.log_dir / f"{name}.{n}.log",
        )
        proc.start()
        self.processes.append(proc)
        return proc

    def stop(self, proc: ManagedProcess, timeout: float = 15.0) -> None:
        proc.stop(timeout=timeout)
        if proc in self.processes:
            self.processes.remove(proc)

    def kill(self, proc: ManagedProcess) -> None:
        proc.kill()
        if proc in self.processes:
            self.processes.remove(proc)

    def wait_worker_ready(self, proc: ManagedProcess, timeout: float = 60.0) -> None:
        """Until a Celery worker's log says ``ready.`` (it consumes from then on)."""

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-3000:]}")
            return "ready." in proc.log_text()

        wait_for(ready, timeout, f"{proc.name} ready", interval=0.1)

    def wait_http(self, port: int, path: str = "/", timeout: float = 60.0) -> None:
        """Until something answers HTTP on 127.0.0.1:``port``."""
        import requests

        def up() -> bool:
            try:
                requests.get(f"http://127.0.0.1:{port}{path}", timeout=2)
                return True
            except requests.RequestException:
                return False

        wait_for(up, timeout, f"HTTP on port {port}", interval=0.1)

    def free_port(self) -> int:
        return free_port()

    # --- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, drop the databases, stop embedded servers."""
        stop_all(self.processes, timeout=15)
        self.processes.clear()
        for name in self.databases:
            try:
                with self.admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # the server may be gone already
                print(f"could not drop {name}: {exc}", file=sys.stderr)
        self.admin.dispose()
        if self._redis is not None:
            self._redis.stop()
        if self._pg is not None:
            self._pg.stop()
        import shutil

        if self.keep_logs:  # keep the logs only: the servers' data can be gigabytes
            for data in ("postgres", "redis"):
                shutil.rmtree(self.tmp / data, ignore_errors=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def group_rss_bytes(proc: ManagedProcess) -> int:
    """Resident memory of a process and all its descendants (a worker and its pool)."""
    try:
        root = psutil.Process(proc.pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def sample_rss(
    proc: ManagedProcess,
    completed: Callable[[], int],
    load: Callable[[], object],
    total: int,
    every: float,
    timeout: float,
) -> list[tuple[int, int]]:
    """Run ``load()`` while sampling ``(completed(), RSS of proc's group)`` every
    ``every`` seconds, until ``completed()`` reaches ``total``."""
    samples: list[tuple[int, int]] = [(completed(), group_rss_bytes(proc))]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(every):
            samples.append((completed(), group_rss_bytes(proc)))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        load()
        try:
            wait_for(lambda: completed() >= total, timeout, f"{total} tasks to complete", 0.2)
        except TimeoutError:  # a slow machine: keep the samples taken so far
            print(f"RSS sampling stopped after {timeout:.0f}s at {completed()} tasks", flush=True)
    finally:
        stop.set()
        thread.join()
    samples.append((completed(), group_rss_bytes(proc)))
    return samples


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, its live descendants, and the children each of
    them has reaped (a PostgreSQL backend that exited counts in the postmaster's)."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for member in members:
        try:
            t = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuMeter:
    """CPU seconds each component used between :meth:`start` and :meth:`stop`: every
    process the benchmark started (by name), the embedded PostgreSQL (postmaster and
    backends) and Redis, and this driver. On a 2-core machine running everything, the
    sum per step bounds the throughput: at most ``cores / cpu_per_step`` steps/s."""

    def __init__(self, infra: Infra):
        self.infra = infra
        self._before: dict[str, float] = {}

    def snapshot(self) -> dict[str, float]:
        groups: dict[str, float] = {}
        for proc in self.infra.processes:
            if proc.alive():
                name = proc.name.rsplit(".", 1)[0]
                groups[name] = groups.get(name, 0.0) + tree_cpu_seconds(proc.pid)
        pg = self.infra._pg
        if pg is not None and pg._server is not None:
            try:
                groups["postgres"] = tree_cpu_seconds(pg._server.get_postmaster_info().pid)
            except Exception:  # pgserver's info unreadable: leave PostgreSQL out
                pass
        redis_server = self.infra._redis
        if redis_server is not None and redis_server.process is not None:
            groups["redis"] = tree_cpu_seconds(redis_server.process.pid)
        t = os.times()
        groups["driver"] = t.user + t.system
        return groups

    def start(self) -> None:
        self._before = self.snapshot()

    def stop(self) -> dict[str, float]:
        after = self.snapshot()
        return {
            k: after[k] - self._before.get(k, 0.0)
            for k in after
            if k in self._before and after[k] - self._before[k] > 0.0005
        }
