"""The soak: many mixed tasks while a loop SIGKILLs a random worker every few seconds.

Not part of CI. It runs the Procfile's real processes (web, beat and several workers)
over an embedded PostgreSQL and Redis (or ``DATABASE_URL`` / ``REDIS_URL``), submits
``--tasks`` mixed tasks spread over ``--duration`` seconds, and every ``--kill-every``
seconds SIGKILLs the whole process group of a random worker and starts a new one (as a
platform restarts a crashed dyno). Then it waits for every task to finish and reports:

- tasks lost: accepted with ``202`` but missing from the database;
- stuck tasks: not terminal ``--grace`` seconds after the last kill;
- duplicated side effects: ledger keys (``Idempotency-Key`` of the ``calls`` agent)
  received more than once, apart from calls a kill interrupted (started, and not yet
  logged as completed, when the worker died: those are repeated with the same key by
  design, RUNTIME.md), and webhook events answered ``2xx`` more than once;
- missing side effects: completed ``calls`` tasks whose ledger lacks a step;
- state-machine violations seen by the status watcher (tests/faults/watcher.py);
- recovery times: for every task a kill interrupted (the killed worker held its lease),
  the time from the kill until a live worker held its step again (p50, p90, max);
- how long runnable tasks sat with no worker on them, and the deepest queues.

    python -m bench.soak                         # 1,000 tasks, 10 minutes, 3 workers
    python -m bench.soak --tasks 200 --duration 120 --workers 2

Prints a summary and writes it as JSON (``--out``); exits 1 when anything was lost,
stuck, duplicated or regressed.

``bench/chaos.py`` builds on this class: every step slot kept busy, and beat, Redis and
PostgreSQL restarted as well as workers killed (docs/reliability.md, "The chaos run").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib
import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis, free_port  # noqa: E402
from app.dev.processes import ManagedProcess, stop_all  # noqa: E402
from app.settings import database_url_for_sqlalchemy  # noqa: E402
from app.store import db, tenants  # noqa: E402
from tests.faults.ledger import Ledger  # noqa: E402
from tests.faults.watcher import TERMINAL, StatusWatcher  # noqa: E402
from tests.harness import read_procfile  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Kill:
    at: float  # monotonic
    worker: str
    # Live leases at the kill: task id -> (step, attempt, lease token, lease expiry).
    leased: dict[str, tuple[int, int, str, Any]]
    interrupted_keys: set[str]  # calls started and not logged complete at the kill
    victims: set[str] | None = None  # the leases the killed worker held (known later)
    resumed: dict[str, float] = field(default_factory=dict)  # task id -> seconds to resume


class Soak:
    """One soak run: servers, processes, ledger, submitter, killer, monitor."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="outlast-soak-"))
        self.procfile = read_procfile(ROOT)
        self.processes: list[ManagedProcess] = []
        self.workers: list[ManagedProcess] = []
        self.counts: Counter[str] = Counter()
        self.accepted: dict[str, dict[str, Any]] = {}  # task id -> {"agent", "input", ...}
        self.submit_errors: Counter[str] = Counter()
        self.kills: list[Kill] = []
        self.lock = threading.Lock()
        self.stop_killing = threading.Event()
        self.stop_monitor = threading.Event()
        self.max_queue: dict[str, int] = {}
        self.idle_since: dict[str, float] = {}
        self.idle_stretches: list[float] = []
        self._pg: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None

    # --- set-up ------------------------------------------------------------------------------

    def start_servers(self) -> None:
        given_db = os.environ.get("DATABASE_URL")
        given_redis = os.environ.get("REDIS_URL")
        if given_db:
            self.database_url = database_url_for_sqlalchemy(given_db)
        else:
            self._pg = EmbeddedPostgres(self.tmp / "postgres")
            self._pg.start()
            self.database_url = self._pg.url_for("postgres")
        if given_redis:
            self.redis_url = given_redis
        else:
            self._redis = EmbeddedRedis(self.tmp / "redis")
            self.redis_url = self._redis.start()
        db.upgrade(self.database_url)
        self.redis = redis_lib.Redis.from_url(self.redis_url)
        self.engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        with self.engine.begin() as conn:
            self.tenant = tenants.create(conn, f"soak-{uuid.uuid4().hex[:8]}")
        self.web_port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            "OUTLAST_LEASE_SECONDS": str(self.args.lease),
            "OUTLAST_REAPER_INTERVAL_SECONDS": str(self.args.reaper),
            "OUTLAST_MAX_ATTEMPTS": str(self.args.max_attempts),
            "OUTLAST_WEBHOOK_SWEEP_SECONDS": "1",
            "OUTLAST_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "OUTLAST_WEBHOOK_ALLOW_PRIVATE": "1",
            "OUTLAST_BIND_HOST": "127.0.0.1",
            "OUTLAST_WORKER_CONCURRENCY": str(self.args.concurrency),
            "OUTLAST_LOG_LEVEL": self.args.log_level,
            "WEB_CONCURRENCY": "2",
        }
        self.base_url = f"http://127.0.0.1:{self.web_port}"

    def spawn(self, name: str) -> ManagedProcess:
        self.counts[name] += 1
        env = dict(self.env)
        if name == "web":
            env["PORT"] = str(self.web_port)
        proc = ManagedProcess(
            f"{name}.{self.counts[name]}",
            self.procfile[name],
            env=env,
            cwd=ROOT,
            log_path=self.tmp / "logs" / f"{name}.{self.counts[name]}.log",
        ).start()
        self.processes.append(proc)
        if name == "worker":
            self.workers.append(proc)
        return proc

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError("web did not become ready")

    # --- the client --------------------------------------------------------------------------

    def task_spec(self, i: int) -> dict[str, Any]:
        """A mixed workload: tool calls, plain steps, durable timers; some with webhooks."""
        kind = self.rng.choices(["calls", "echo", "sleepy"], weights=[6, 3, 1])[0]
        if kind == "calls":
            body = {
                "agent": "calls",
                "input": {
                    "url": self.ledger.url + "/calls",
                    "calls": self.rng.randint(1, 6),
                    "step_seconds": round(self.rng.uniform(0.1, 1.5), 2),
                },
            }
        elif kind == "echo":
            body = {
                "agent": "echo",
                "input": {
                    "message": f"soak {i}",
                    "steps": self.rng.randint(1, 6),
                    "step_seconds": round(self.rng.uniform(0, 1.0), 2),
                },
            }
        else:
            body = {"agent": "sleepy", "input": {"seconds": self.rng.randint(1, 5)}}
        if self.rng.random() < 0.3:
            body["webhook_url"] = self.ledger.url + "/hooks"
        return body

    def submit_all(self) -> None:
        """Submit the tasks evenly over the first 80% of the duration (retrying a failed
        submission with the same Idempotency-Key, as a careful client does)."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.tenant.api_key}"
        spread = 0.8 * self.args.duration
        started = time.monotonic()
        for i in range(self.args.tasks):
            due = started + spread * i / max(1, self.args.tasks)
            time.sleep(max(0.0, due - time.monotonic()))
            body = self.task_spec(i)
            self.submit_one(session, i, body, f"soak-{i}")

    def submit_one(
        self, session: requests.Session, i: int, body: dict, key: str, tries: int = 30
    ) -> None:
        """Submit task ``i``, retrying with the same Idempotency-Key on an error or a
        non-202 answer (as a careful client does); every 20th is also watched through the
        API."""
        for _attempt in range(tries):
            try:
                response = session.post(
                    self.base_url + "/v1/tasks",
                    json=body,
                    headers={"Idempotency-Key": key},
                    timeout=15,
                )
            except requests.RequestException as exc:
                self.submit_errors[type(exc).__name__] += 1
                time.sleep(0.5)
                continue
            if response.status_code == 202:
                task_id = response.json()["id"]
                with self.lock:
                    self.accepted[task_id] = body
                if i % 20 == 0:  # a sample is also watched through the API
                    self.watcher.track(task_id)
                return
            self.submit_errors[str(response.status_code)] += 1
            time.sleep(0.5)
        self.submit_errors["gave_up"] += 1

    # --- the killer and the monitor ------------------------------------------------------------

    def leased_now(self) -> dict[str, tuple[int, int, str, Any]]:
        """Unexpired leases right now (an expired one belongs to an earlier kill)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT id, step, attempt, lease_token, lease_expires_at FROM tasks "
                    "WHERE lease_token IS NOT NULL AND status = 'working' "
                    "AND lease_expires_at > now()"
                )
            ).all()
        return {r.id: (r.step, r.attempt, r.lease_token, r.lease_expires_at) for r in rows}

    def started_calls(self) -> set[str]:
        """Keys of tool calls started and not (yet) logged as completed."""
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    sa.text("SELECT idempotency_key FROM tool_calls WHERE status = 'started'")
                ).scalars()
            )

    def kill_loop(self) -> None:
        while not self.stop_killing.wait(self.args.kill_every):
            live = [w for w in self.workers if w.alive()]
            if not live:
                continue
            victim = self.rng.choice(live)
            leased = self.leased_now()
            # Calls a kill may interrupt: in flight at the ledger, or answered but not yet
            # logged as completed (RUNTIME.md: those are made again, with the same key).
            interrupted = self.started_calls() | {r.key for r in self.ledger.in_flight("/calls")}
            at = time.monotonic()
            victim.kill()
            interrupted |= self.started_calls()
            self.workers.remove(victim)
            self.kills.append(Kill(at, victim.name, leased, interrupted))
            self.spawn("worker")
            print(
                f"[{at - self.t0:6.1f}s] killed {victim.name} ({len(leased)} live leases "
                f"system-wide, {len(interrupted)} calls started and not logged complete)",
                flush=True,
            )

    def monitor_loop(self) -> None:
        """Time each interrupted task's resumption.

        The killed worker's leases are the ones nobody renewed: a lease + 0.5 s after
        the kill, a task leased at the kill whose lease is unchanged (same token, same
        expiry: live workers renew every lease/3) or already reaped (attempt grew) was
        on the killed worker. It has resumed at the first moment a worker holds it
        under a new token, or it moved past the step, or it finished.
        """
        next_idle_check = 0.0
        while not self.stop_monitor.wait(0.1):
            now = time.monotonic()
            if now >= next_idle_check:
                self.check_idle()
                self.sample_queues()
                next_idle_check = now + 0.5
            kills = [k for k in self.kills if k.leased]
            due = [k for k in kills if k.victims is None and now >= k.at + self.args.lease + 0.5]
            watching = [k for k in kills if k.victims and len(k.resumed) < len(k.victims)]
            if not due and not watching:
                continue
            ids = list({t for k in due + watching for t in k.leased})
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(
                        sa.text(
                            "SELECT id, step, attempt, status::text AS status, lease_token, "
                            "lease_expires_at FROM tasks WHERE id = ANY(:ids)"
                        ),
                        {"ids": ids},
                    ).all()
            except Exception:
                continue
            now = time.monotonic()
            by_id = {r.id: r for r in rows}
            for kill in due:
                kill.victims = set()
                for task_id, (_step, attempt, token, expires) in kill.leased.items():
                    row = by_id[task_id]
                    unrenewed = row.lease_token == token and row.lease_expires_at == expires
                    if unrenewed or row.attempt > attempt:
                        kill.victims.add(task_id)
            for kill in due + watching:
                for task_id in kill.victims - set(kill.resumed):
                    step, _attempt, token, _expires = kill.leased[task_id]
                    row = by_id[task_id]
                    released = row.lease_token is not None and row.lease_token != token
                    if released or row.step > step or row.status in TERMINAL:
                        kill.resumed[task_id] = now - kill.at

    def sample_queues(self) -> None:
        """The broker's backlog: step messages and sweep messages waiting."""
        try:
            depth = {q: self.redis.llen(q) for q in ("steps", "maintenance", "webhooks")}
        except Exception:
            return
        for queue, n in depth.items():
            self.max_queue[queue] = max(self.max_queue.get(queue, 0), n)

    def check_idle(self) -> None:
        """Track how long runnable tasks sit with no worker on them (queued, or their
        message lost with a killed worker until a sweep re-sends it)."""
        try:
            with self.engine.connect() as conn:
                idle = set(
                    conn.execute(
                        sa.text(
                            "SELECT id FROM tasks WHERE status IN ('pending', 'working') "
                            "AND lease_token IS NULL AND wake_at IS NULL"
                        )
                    ).scalars()
                )
        except Exception:
            return
        now = time.monotonic()
        for task_id in list(self.idle_since):
            if task_id not in idle:
                self.idle_stretches.append(now - self.idle_since.pop(task_id))
        for task_id in idle:
            self.idle_since.setdefault(task_id, now)

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        self.start_servers()
        self.ledger = Ledger()
        self.spawn("web")
        self.spawn("beat")
        for _ in range(args.workers):
            self.spawn("worker")
        self.wait_ready()
        self.watcher = StatusWatcher(interval=0.5, api_interval=1.0).start(
            self.database_url, self.base_url, self.tenant.api_key
        )
        self.t0 = time.monotonic()
        killer = threading.Thread(target=self.kill_loop, daemon=True)
        monitor = threading.Thread(target=self.monitor_loop, daemon=True)
        killer.start()
        monitor.start()
        submitter = threading.Thread(target=self.submit_all, daemon=True)
        submitter.start()
        submitter.join(args.duration + 600)
        remaining = args.duration - (time.monotonic() - self.t0)
        if remaining > 0:
            time.sleep(remaining)
        self.stop_killing.set()
        killer.join(30)
        last_kill = time.monotonic()
        print(f"[{last_kill - self.t0:6.1f}s] kills stopped; waiting for every task", flush=True)
        deadline = last_kill + args.grace
        while time.monotonic() < deadline and self.active_count() > 0:
            time.sleep(1)
        time.sleep(3)  # late webhook retries
        self.stop_monitor.set()
        monitor.join(10)
        self.watcher.stop()
        return self.report(time.monotonic() - self.t0)

    def active_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT count(*) FROM tasks WHERE status IN ('pending', 'working', "
                    "'input_required')"
                )
            ).scalar_one()

    def report(self, elapsed: float) -> dict[str, Any]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT id, agent, status::text AS status, attempt, error, input "
                    "FROM tasks WHERE tenant_id = :t"
                ),
                {"t": self.tenant.tenant_id},
            ).all()
        tasks = {r.id: r for r in rows}
        lost = sorted(set(self.accepted) - set(tasks))
        stuck = sorted(t for t, r in tasks.items() if r.status not in TERMINAL)
        statuses = Counter(r.status for r in tasks.values())
        failures = Counter((r.error or {}).get("type") for r in tasks.values() if r.error)
        # Side effects of the calls agent, counted per key.
        interrupted_at_kills = set().union(*(k.interrupted_keys for k in self.kills))
        counts = self.ledger.counts("/calls")
        repeated = {k: n for k, n in counts.items() if n > 1}
        duplicated = {k: n for k, n in repeated.items() if k not in interrupted_at_kills}
        missing = []
        for task_id, row in tasks.items():
            if row.agent == "calls" and row.status == "completed":
                steps = self.ledger.call_keys_by_step(task_id)
                if sorted(steps) != list(range(row.input["calls"])):
                    missing.append(task_id)
        # Webhooks: one 2xx per event is the goal; more is an at-least-once duplicate.
        hook_ok = Counter(
            r.key
            for r in self.ledger.snapshot("/hooks")
            if r.status is not None and 200 <= r.status < 300
        )
        hook_dupes = {k: n for k, n in hook_ok.items() if n > 1}
        recoveries = [s for k in self.kills for s in k.resumed.values()]
        unresumed = sum(len((k.victims or set()) - set(k.resumed)) for k in self.kills)
        result = {
            "command": " ".join(sys.argv),
            "settings": {
                "tasks": self.args.tasks,
                "duration_s": self.args.duration,
                "workers": self.args.workers,
                "concurrency": self.args.concurrency,
                "kill_every_s": self.args.kill_every,
                "lease_s": self.args.lease,
                "reaper_s": self.args.reaper,
                "max_attempts": self.args.max_attempts,
                "seed": self.args.seed,
            },
            "elapsed_s": round(elapsed, 1),
            "accepted": len(self.accepted),
            "submit_errors": dict(self.submit_errors),
            "statuses": dict(statuses),
            "failures_by_type": dict(failures),
            "tasks_lost": len(lost),
            "stuck_tasks": len(stuck),
            "kills": len(self.kills),
            "interrupted_tasks": len(recoveries),
            "interrupted_not_resumed": unresumed,
            "recovery_s": {
                "p50": _round(statistics.median(recoveries)) if recoveries else None,
                "p90": _round(percentile(recoveries, 0.9)),
                "max": _round(max(recoveries)) if recoveries else None,
            },
            # Runnable with nobody on it: queued behind others, or its message lost with
            # a killed worker before it took the lease (the lost-message sweep re-sends).
            "idle_stretch_s": {
                "p50": _round(percentile(self.idle_stretches, 0.5)),
                "p99": _round(percentile(self.idle_stretches, 0.99)),
                "max": _round(max(self.idle_stretches)) if self.idle_stretches else None,
            },
            "max_queue_depth": self.max_queue,
            "calls_made": sum(counts.values()),
            "call_keys": len(counts),
            "calls_repeated_after_kill": len(repeated) - len(duplicated),
            "duplicated_side_effects": len(duplicated),
            "completed_calls_tasks_missing_a_call": len(missing),
            "webhook_events_delivered": len(hook_ok),
            "webhook_events_delivered_twice": len(hook_dupes),
            "per_kill": [
                {
                    "at_s": round(k.at - self.t0, 1),
                    "worker": k.worker,
                    "interrupted": len(k.victims or ()),
                    "resumed_after_s": sorted(_round(v) for v in k.resumed.values()),
                }
                for k in self.kills
            ],
            "status_violations": len(self.watcher.violations()),
            "examples": {
                "lost": lost[:5],
                "stuck": stuck[:5],
                "duplicated": list(duplicated.items())[:5],
                "missing": missing[:5],
                "violations": self.watcher.violations()[:5],
            },
        }
        return result

    def close(self) -> None:
        stop_all(self.processes, timeout=10)
        if hasattr(self, "ledger"):
            self.ledger.close()
        if hasattr(self, "engine"):
            self.engine.dispose()
        if hasattr(self, "redis"):
            self.redis.close()
        if self._redis is not None:
            self._redis.stop()
        if self._pg is not None:
            self._pg.stop()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=600, help="seconds of submitting+killing")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--kill-every", type=float, default=20)
    parser.add_argument("--lease", type=float, default=3)
    parser.add_argument("--reaper", type=float, default=1)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--grace", type=float, default=180, help="wait for tasks after kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="WARNING", help="of the stack's processes")
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args(argv)
    soak = Soak(args)
    try:
        result = soak.run()
    finally:
        soak.close()
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bad = (
        result["tasks_lost"]
        + result["stuck_tasks"]
        + result["duplicated_side_effects"]
        + result["completed_calls_tasks_missing_a_call"]
        + result["status_violations"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
