"""Outlast under the same conditions as its baselines: the Procfile's real processes
(``outlast web`` under gunicorn with 2 workers x 4 threads, ``outlast worker`` with
prefork concurrency 2, ``outlast beat``), driven only through the HTTP API, with the
database read directly for timestamps (``tasks.created_at``, ``finished_at``,
``checkpoints.finished_at``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import sqlalchemy as sa

from app.dev.processes import ManagedProcess
from app.store import db, tenants
from bench.baselines import ChainRun
from bench.infra import CpuMeter, Infra, sample_rss, wait_for
from bench.loadgen import http_request, run_load

TERMINAL = ("completed", "failed", "cancelled")

# Data tables emptied between sections (tenants and their keys stay).
DATA_TABLES = (
    "webhook_attempts, webhook_deliveries, outbox, idempotency_keys, events, "
    "tool_calls, checkpoints, tasks"
)


@dataclass
class Recovery:
    """One SIGKILL of a busy worker and what followed."""

    killed_at: float
    step: int  # the step that was running
    next_checkpoint_after: float  # seconds from the kill to that step's checkpoint
    attempt_before: int
    attempt_after: int

    @property
    def hit_the_busy_worker(self) -> bool:
        """The killed worker held the step's lease (else it was the idle one: Redis
        may hand any step to either worker, so the caller tries again)."""
        return self.attempt_after == self.attempt_before + 1

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class OutlastStack:
    """Outlast's database, tenant and processes for one benchmark run."""

    def __init__(
        self,
        infra: Infra,
        *,
        name: str = "outlast",
        web_workers: int = 2,
        web_threads: int = 4,
        worker_concurrency: int = 2,
        env: Mapping[str, str] | None = None,
        code_root: str | None = None,
    ):
        """``code_root``: run the processes from another checkout of Outlast (first on
        PYTHONPATH), to measure a change beside the current code in the same run."""
        self.infra = infra
        self.name = name
        self.database_url = infra.create_database(name)
        db.upgrade(self.database_url)
        self.engine = sa.create_engine(self.database_url, pool_size=2)
        with self.engine.begin() as conn:
            created = tenants.create(conn, f"bench-{uuid.uuid4().hex[:8]}")
        self.api_key = created.api_key
        self.tenant_id = created.tenant_id
        self.redis_url = infra.redis_url(name)
        self.port = infra.free_port()
        self.worker_concurrency = worker_concurrency
        self.env = infra.base_env(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "PORT": str(self.port),
                "WEB_CONCURRENCY": str(web_workers),
                "OUTLAST_WEB_THREADS": str(web_threads),
                "OUTLAST_WORKER_CONCURRENCY": str(worker_concurrency),
                "OUTLAST_BIND_HOST": "127.0.0.1",
                "OUTLAST_LOG_LEVEL": "INFO",
                # One key drives every section: measure the engine, not the rate limit
                # (the waiters section measures the rate limit's own cost).
                "OUTLAST_RATE_LIMIT_PER_SECOND": "0",
                **(env or {}),
            }
        )
        if code_root:
            self.env["PYTHONPATH"] = f"{code_root}:{self.env['PYTHONPATH']}"
        self.web: ManagedProcess | None = None
        self.workers: list[ManagedProcess] = []
        self.beat: ManagedProcess | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.api_key}"

    # --- processes ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_web(self) -> None:
        self.web = self.infra.start(f"{self.name}-web", ["outlast", "web"], self.env)
        self.infra.wait_http(self.port, "/healthz")

    def start_worker(
        self, env: Mapping[str, str] | None = None, wait: bool = True
    ) -> ManagedProcess:
        """``outlast worker`` (the Procfile's line, SIGTERM remapped to SIGQUIT);
        ``wait=False`` returns before it is ready."""
        worker = self.infra.start(
            f"{self.name}-worker",
            ["outlast", "worker", "--concurrency", str(self.worker_concurrency)],
            {**self.env, "REMAP_SIGTERM": "SIGQUIT", **(env or {})},
        )
        if wait:
            self.infra.wait_worker_ready(worker)
        self.workers.append(worker)
        return worker

    def start_beat(self, env: Mapping[str, str] | None = None) -> None:
        self.beat = self.infra.start(
            f"{self.name}-beat", ["outlast", "beat"], {**self.env, **(env or {})}
        )

    def stop_workers(self) -> None:
        for worker in self.workers:
            self.infra.stop(worker)
        self.workers.clear()
        if self.beat is not None:
            self.infra.stop(self.beat)
            self.beat = None

    def kill_worker(self, worker: ManagedProcess) -> None:
        self.infra.kill(worker)
        self.workers.remove(worker)

    def reset(self) -> None:
        """Empty the task tables and the broker (between sections; no process running
        that could hold a message)."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {DATA_TABLES}")
        self.infra.flush_redis(self.name)

    # --- the API --------------------------------------------------------------------------

    def submit(self, agent_input: Mapping, agent: str = "echo", session=None) -> str:
        """``POST /v1/tasks`` with an Idempotency-Key; the new task's id."""
        answer = (session or self.session).post(
            self.base_url + "/v1/tasks",
            json={"agent": agent, "input": dict(agent_input)},
            headers={"Idempotency-Key": uuid.uuid4().hex},
            timeout=30,
        )
        if answer.status_code != 202:
            raise RuntimeError(f"POST /v1/tasks answered {answer.status_code}: {answer.text}")
        return answer.json()["id"]

    def submit_many(self, count: int, agent_input: Mapping, connections: int = 8) -> list[str]:
        """``count`` submissions over ``connections`` concurrent keep-alive clients."""
        sessions = []
        for _ in range(connections):
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {self.api_key}"
            sessions.append(s)

        def one(i: int) -> str:
            return self.submit(agent_input, session=sessions[i % connections])

        with ThreadPoolExecutor(connections) as pool:
            ids = list(pool.map(one, range(count)))
        for s in sessions:
            s.close()
        return ids

    def submit_request(self, i: int) -> bytes:
        """One raw ``POST /v1/tasks`` for the load generator (a fresh Idempotency-Key)."""
        body = json.dumps({"agent": "echo", "input": {"message": "hello"}}).encode()
        return http_request(
            "POST",
            "/v1/tasks",
            f"127.0.0.1:{self.port}",
            {
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
                "Idempotency-Key": uuid.uuid4().hex,
            },
            body,
        )

    def wait_completed_via_long_poll(self, task_id: str, timeout: float = 60) -> dict:
        """``GET /v1/tasks/{id}?wait=30`` until the client sees ``completed``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.session.get(f"{self.base_url}/v1/tasks/{task_id}?wait=30", timeout=40)
            answer.raise_for_status()
            task = answer.json()
            if task["status"] in TERMINAL:
                if task["status"] != "completed":
                    raise RuntimeError(f"task {task_id} ended {task['status']}: {task}")
                return task
        raise TimeoutError(f"task {task_id} not completed in {timeout}s")

    # --- the database (clocks and progress) ------------------------------------------------

    def wait_terminal(self, ids: list[str], timeout: float = 300) -> None:
        def done() -> bool:
            with self.engine.connect() as conn:
                n = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM tasks WHERE id = ANY(:ids) "
                        "AND status IN ('completed', 'failed', 'cancelled')"
                    ),
                    {"ids": ids},
                ).scalar_one()
            return n == len(ids)

        wait_for(done, timeout, f"{len(ids)} tasks to finish", interval=0.05)

    def run_tasks(self, count: int, steps: int, timeout: float = 300) -> ChainRun:
        """``count`` echo tasks of ``steps`` steps at once: created -> last finished."""
        meter = CpuMeter(self.infra)
        meter.start()
        ids = self.submit_many(count, {"message": "bench", "steps": steps})
        self.wait_terminal(ids, timeout)
        cpu = meter.stop()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT extract(epoch FROM min(created_at)) AS started, "
                    "extract(epoch FROM max(finished_at)) AS finished, "
                    "count(*) FILTER (WHERE status = 'completed' AND step = :steps) AS ok "
                    "FROM tasks WHERE id = ANY(:ids)"
                ),
                {"ids": ids, "steps": steps},
            ).one()
        if row.ok != count:
            raise RuntimeError(f"only {row.ok}/{count} echo tasks completed all {steps} steps")
        return ChainRun(count, steps, float(row.finished) - float(row.started), cpu)

    def one_step_latencies(self, samples: int) -> list[float]:
        """Submit a one-step echo task, then long-poll until ``completed``: seconds each."""
        timings = []
        for _ in range(samples):
            t0 = time.perf_counter()
            task_id = self.submit({"message": "ping", "steps": 1})
            self.wait_completed_via_long_poll(task_id)
            timings.append(time.perf_counter() - t0)
        return timings

    def prefer_wait_latencies(self, samples: int) -> list[float]:
        """``POST /v1/tasks`` of a one-step echo task with ``Prefer: wait=10`` (V2.md 3):
        the answer is the completed task itself. Seconds each."""
        timings = []
        for _ in range(samples):
            t0 = time.perf_counter()
            answer = self.session.post(
                self.base_url + "/v1/tasks",
                json={"agent": "echo", "input": {"message": "ping", "steps": 1}},
                headers={"Idempotency-Key": uuid.uuid4().hex, "Prefer": "wait=10"},
                timeout=30,
            )
            elapsed = time.perf_counter() - t0
            if answer.status_code != 200 or answer.json()["status"] != "completed":
                raise RuntimeError(f"Prefer: wait answered {answer.status_code}: {answer.text}")
            timings.append(elapsed)
        return timings

    def task_row(self, task_id: str):
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT step, attempt, status, lease_token FROM tasks WHERE id = :id"),
                {"id": task_id},
            ).one()

    def checkpoint_time(self, task_id: str, step: int) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT extract(epoch FROM finished_at) FROM checkpoints "
                    "WHERE task_id = :id AND step_index = :step"
                ),
                {"id": task_id, "step": step},
            ).scalar()

    def recover_once(
        self,
        step_seconds: float = 0.5,
        timeout: float = 120,
        worker_env: Mapping[str, str] | None = None,
    ) -> Recovery:
        """SIGKILL the worker that ran the task's last steps, mid-step, a second worker
        being idle and ready; time from the kill to the interrupted step's checkpoint.
        Check :attr:`Recovery.hit_the_busy_worker`: the step may have gone to the other."""
        busy = self.workers[-1]
        task_id = self.submit({"message": "recover", "steps": 1000, "step_seconds": step_seconds})
        wait_for(
            lambda: (r := self.task_row(task_id)).step >= 2 and r.lease_token is not None,
            60,
            "the task to run its third step",
            interval=0.01,
        )
        self.start_worker(worker_env)  # idle and ready when the kill comes
        # Kill in the middle of a step: just after a step began (lease taken).
        row = self.task_row(task_id)
        step = row.step
        wait_for(
            lambda: (r := self.task_row(task_id)).step > step and r.lease_token is not None,
            30,
            "the next step to start",
            interval=0.005,
        )
        time.sleep(step_seconds / 2)
        row = self.task_row(task_id)
        killed_at = time.time()
        self.kill_worker(busy)
        running = row.step
        at = wait_for(
            lambda: self.checkpoint_time(task_id, running), timeout, "the next checkpoint"
        )
        after = self.task_row(task_id)
        # The survivor is the next round's busy worker; stop the task.
        self.session.post(f"{self.base_url}/v1/tasks/{task_id}/cancel", timeout=10)
        return Recovery(killed_at, running, float(at) - killed_at, row.attempt, after.attempt)

    def completed_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM tasks WHERE status = 'completed'")
            ).scalar_one()

    def rss_over_tasks(
        self, total: int, connections: int = 4, every: float = 0.5, timeout: float = 600
    ) -> list[tuple[int, int]]:
        """Run ``total`` one-step echo tasks (submitted through the API while the worker
        runs); ``(tasks completed, worker RSS bytes incl. pool children)`` samples."""
        worker = self.workers[0]

        def request(i: int) -> bytes:
            body = json.dumps({"agent": "echo", "input": {"message": f"m{i}"}}).encode()
            return http_request(
                "POST",
                "/v1/tasks",
                f"127.0.0.1:{self.port}",
                {
                    "Authorization": f"Bearer {self.api_key}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": uuid.uuid4().hex,
                },
                body,
            )

        return sample_rss(
            worker,
            self.completed_count,
            lambda: run_load(
                self.port,
                request,
                connections=connections,
                duration=timeout,
                warmup=0,
                max_requests=total,
            ),
            total,
            every,
            timeout,
        )

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()
