"""The baselines: raw Celery chains, the hand-rolled PostgreSQL-checkpoint chain, DBOS
Transact, the naive submission endpoints and the raw Celery round trip.

Each contender runs in real subprocesses started here (a Celery worker with prefork
concurrency 2, gunicorn, DBOS processes); the driver only sends work and reads clocks.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib
import sqlalchemy as sa
from celery import Celery

from app.dev.processes import ManagedProcess
from bench import baseline_schema
from bench.infra import CpuMeter, Infra, sample_rss, wait_for
from bench.loadgen import http_request

QUEUE = "bench"


@dataclass
class ChainRun:
    """One throughput or latency run: ``chains`` chains of ``steps`` steps."""

    chains: int
    steps: int
    elapsed: float  # first message sent -> last chain finished, seconds
    cpu: dict[str, float] | None = None  # CPU seconds by component during the run

    @property
    def steps_per_second(self) -> float:
        return self.chains * self.steps / self.elapsed

    @property
    def ms_per_step(self) -> float:
        """Wall time per step along one chain (meaningful for a chain alone)."""
        return self.elapsed / self.steps * 1000.0

    def as_dict(self) -> dict:
        return {
            "chains": self.chains,
            "steps": self.steps,
            "elapsed_s": self.elapsed,
            "steps_per_s": self.steps_per_second,
            "ms_per_step": self.ms_per_step,
            "cpu_ms_per_step": {
                k: v * 1000.0 / (self.chains * self.steps) for k, v in (self.cpu or {}).items()
            },
        }


class CeleryBaseline:
    """A Celery worker (prefork, concurrency 2) for ``bench.baseline_app`` and a client.

    The app has Outlast's own Celery configuration, so raw Celery here costs what
    Celery costs Outlast; the worker's command line is Outlast's ``outlast worker``'s.
    """

    def __init__(self, infra: Infra, concurrency: int = 2, loglevel: str = "INFO"):
        self.infra = infra
        self.database_url = infra.create_database("baseline")
        self.redis_url = infra.redis_url("baseline")
        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql(baseline_schema.BASELINE_SCHEMA)
        engine.dispose()
        self.engine = sa.create_engine(self.database_url, pool_size=2)
        self.env = infra.base_env({"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url})
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.worker: ManagedProcess | None = None
        self.client = Celery("bench-client", broker=self.redis_url, backend=self.redis_url)
        self.client.conf.update(
            task_serializer="json",
            accept_content=["json"],
            result_serializer="json",
            broker_connection_retry_on_startup=True,
        )
        # A generous socket timeout: BLPOP waits up to a second, on a busy machine.
        self.redis = redis_lib.Redis.from_url(self.redis_url, socket_timeout=30)

    def start_worker(self, wait: bool = True) -> ManagedProcess:
        """Start the worker; ``wait=False`` returns at once (see :meth:`Infra.wait_worker_ready`)."""
        argv = [
            "celery",
            "-A",
            "bench.baseline_app",
            "worker",
            "--queues",
            QUEUE,
            "--pool",
            "prefork",
            "--concurrency",
            str(self.concurrency),
            "--events",
            "--loglevel",
            self.loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
        self.worker = self.infra.start("baseline-worker", argv, self.env)
        if wait:
            self.infra.wait_worker_ready(self.worker)
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.infra.stop(self.worker)
            self.worker = None

    def reset(self) -> None:
        """Empty the queue, the done list and the checkpoint tables."""
        self.redis.delete(baseline_schema.DONE_KEY, QUEUE)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE bench_checkpoints, bench_step_log, bench_submissions")

    def run_chains(self, task_name: str, chains: int, steps: int, timeout: float = 300) -> ChainRun:
        """Start ``chains`` chains of ``task_name`` at once; wait for all to finish."""
        self.redis.delete(baseline_schema.DONE_KEY)
        ids = [f"c{uuid.uuid4().hex[:10]}" for _ in range(chains)]
        meter = CpuMeter(self.infra)
        meter.start()
        started = time.time()
        with self.client.producer_or_acquire() as producer:
            for chain_id in ids:
                self.client.send_task(
                    task_name, args=[chain_id, 0, steps], queue=QUEUE, producer=producer
                )
        finished: list[float] = []
        deadline = time.monotonic() + timeout
        while len(finished) < chains:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{task_name}: {len(finished)}/{chains} chains finished")
            item = self.redis.blpop([baseline_schema.DONE_KEY], timeout=1)
            if item is not None:
                finished.append(json.loads(item[1])["finished"])
        return ChainRun(chains, steps, max(finished) - started, meter.stop())

    def round_trips(self, samples: int) -> list[float]:
        """``bench.ping.delay().get()`` timings in seconds (the raw Celery round trip)."""
        timings = []
        for _ in range(samples):
            t0 = time.perf_counter()
            self.client.send_task("bench.ping", args=[time.time()], queue=QUEUE).get(timeout=30)
            timings.append(time.perf_counter() - t0)
        return timings

    def rss_over_tasks(self, total: int, every: float = 0.5, timeout: float = 600):
        """Run ``total`` one-step raw tasks; ``(tasks completed, worker RSS)`` samples."""
        assert self.worker is not None
        self.redis.delete(baseline_schema.DONE_KEY)

        def send_all() -> None:
            with self.client.producer_or_acquire() as producer:
                for i in range(total):
                    self.client.send_task(
                        "bench.raw_step", args=[f"r{i}", 0, 1], queue=QUEUE, producer=producer
                    )

        return sample_rss(
            self.worker,
            lambda: self.redis.llen(baseline_schema.DONE_KEY),
            send_all,
            total,
            every,
            timeout,
        )

    def close(self) -> None:
        self.stop_worker()
        self.redis.close()
        self.engine.dispose()


class NaiveWeb:
    """gunicorn serving ``bench.naive_web`` like Outlast's web (gthread, 2 x 4)."""

    def __init__(self, celery_baseline: CeleryBaseline, workers: int = 2, threads: int = 4):
        self.baseline = celery_baseline
        self.infra = celery_baseline.infra
        self.port = self.infra.free_port()
        argv = [
            "gunicorn",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--worker-class",
            "gthread",
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--timeout",
            "60",
            "--no-control-socket",
            "bench.naive_web:app",
        ]
        self.process = self.infra.start("naive-web", argv, celery_baseline.env)
        self.infra.wait_http(self.port)

    def naive_request(self, i: int) -> bytes:
        body = json.dumps({"agent": "echo", "input": {"message": "hello"}}).encode()
        return http_request(
            "POST",
            "/naive",
            f"127.0.0.1:{self.port}",
            {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex},
            body,
        )

    def noop_request(self, i: int) -> bytes:
        return http_request("POST", "/noop", f"127.0.0.1:{self.port}", {}, b"")

    def stop(self) -> None:
        self.infra.stop(self.process)


class DBOSBaseline:
    """DBOS Transact in its own database; ``run`` starts the processes of one run."""

    def __init__(self, infra: Infra):
        self.infra = infra
        infra.create_database("dbos")
        self.url = infra.libpq_url_for(infra.database_name("dbos"))
        self.env = infra.base_env()
        # Create DBOS's schema once, outside any timing.
        self.run(processes=1, workflows_per_process=1, steps=1)

    def run(self, processes: int, workflows_per_process: int, steps: int, timeout: float = 300):
        """``processes`` DBOS processes each running ``workflows_per_process`` workflows
        of ``steps`` steps, started together once every process has launched."""
        run_dir = self.infra.tmp / f"dbos-{uuid.uuid4().hex[:8]}"
        run_dir.mkdir()
        go = run_dir / "go"
        procs = []
        results = []
        for n in range(processes):
            result = run_dir / f"result-{n}.json"
            results.append(result)
            argv = [
                "python",
                "-m",
                "bench.dbos_chain",
                "--url",
                self.url,
                "--workflows",
                str(workflows_per_process),
                "--steps",
                str(steps),
                "--executor",
                f"bench-{run_dir.name}-{n}",
                "--go-file",
                str(go),
                "--result",
                str(result),
            ]
            procs.append(self.infra.start("dbos", argv, self.env))
        try:

            def launched() -> bool:
                for proc in procs:
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-3000:]}")
                return all(Path(str(r) + ".ready").exists() for r in results)

            wait_for(launched, 120, "DBOS processes to launch")
            meter = CpuMeter(self.infra)
            meter.start()
            go.write_text("go")
            wait_for(
                lambda: (
                    all(r.exists() for r in results)
                    or any(not p.alive() and p.process.returncode for p in procs)
                ),
                timeout,
                "DBOS workflows",
            )
            data = [json.loads(r.read_text()) for r in results]
        finally:
            for proc in procs:
                self.infra.stop(proc)
        elapsed = max(d["finished"] for d in data) - min(d["started"] for d in data)
        cpu = {
            "dbos": sum(d["cpu_s"] for d in data),
            **{k: v for k, v in meter.stop().items() if k not in ("dbos", "driver")},
        }
        return ChainRun(processes * workflows_per_process, steps, elapsed, cpu)
