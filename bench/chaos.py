"""The chaos run: the soak (``bench/soak.py``) with every kind of fault at once.

Not part of CI. Web, beat and several workers (the Procfile's lines) run over a
PostgreSQL and a Redis of the run's own (embedded, on their own socket and port, so
restarting them harms nobody; ``DATABASE_URL`` / ``REDIS_URL`` are ignored). A driver
keeps every step slot busy with a mixed workload and, while it runs:

- every ``--kill-every`` seconds SIGKILLs the whole process group of a random worker
  and starts a new one;
- halfway between two kills, on a fixed timeline per ``--cycle`` kills: SIGKILLs beat
  and starts it again; stops Redis (SIGTERM, no persistence: every queued message is
  lost) and starts it again on the same port and directory; starts a second beat and
  SIGKILLs the first one a kill later (two beats overlap); stops PostgreSQL (fast
  shutdown) and starts it again on the same data directory.

The workload, submitted closed-loop (a new task whenever fewer than ``slots +
--backlog`` tasks are runnable, so the slots stay busy without an ever-growing queue):
``calls`` (1-6 idempotent calls to the ledger, 0.1-1.5 s per step), ``echo`` (1-6 steps
of 0-1 s), ``sleepy`` (1-5 s durable timers), ``approval`` (answered by the driver
through ``POST /v1/tasks/{id}/input``), and ``sleepy`` tasks with a ``timeout_seconds``
shorter than their timer (they must fail with ``timeout`` on time). 30% carry a
webhook to the ledger, which answers ``500`` to every third delivery attempt; a second
tenant sends its webhooks to a tarpit (``tests/faults/tarpit.py``).

At the end it checks: no task lost or stuck; every tool-call key made once except those
a fault interrupted (made again, with the same key); no status regression (the
watcher); every webhook event to the ledger delivered (a ``2xx``), once, or again with
the same ``webhook-id`` only when a fault cut the recording of the first; the tarpit's
sends cut at the timeout and never more in flight than the tenant's cap; recovery
(kill → a live worker holds the task's lease again) against lease + reaper interval +
2 s; slot occupancy; timer and deadline lateness.

    python -m bench.chaos --cycle 10 --repeat-cycle --backlog 4   # full size (1,000 tasks)
    python -m bench.chaos --tasks 100 --cycle 6                   # a small run, ~2 minutes

Prints a summary, writes JSON (``--out``), exits 1 when an invariant failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.dev.processes import ManagedProcess  # noqa: E402
from app.store import tenants  # noqa: E402
from bench.soak import Soak, _round, percentile  # noqa: E402
from tests.faults.ledger import Ledger, Request  # noqa: E402
from tests.faults.tarpit import Tarpit  # noqa: E402
from tests.faults.watcher import StatusWatcher  # noqa: E402

WEBHOOK_TIMEOUT = 3.0
TARPIT_CAP = 2  # OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT in the run


@dataclass
class Fault:
    """One fault the driver made: when, what, and the tool calls it may have cut."""

    at: float  # monotonic
    kind: str  # kill | beat_restart | beat_overlap | beat_overlap_end | redis | postgres
    detail: str = ""
    down_s: float = 0.0
    wall: float = field(default_factory=time.time)  # for matching database timestamps
    # Calls started and not logged complete (or in flight at the ledger): key -> task id.
    interrupted: dict[str, str | None] = field(default_factory=dict)
    leased: dict[str, tuple[int, int, str, Any]] = field(default_factory=dict)
    victims: set[str] | None = None
    resumed: dict[str, float] = field(default_factory=dict)  # a live worker holds it again
    reaped: dict[str, float] = field(default_factory=dict)  # attempt grew (task.retrying)

    @property
    def worker(self) -> str:  # the soak's report names the killed worker
        return self.detail

    @property
    def interrupted_keys(self) -> set[str]:
        return set(self.interrupted)


def _pctl(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": _round(statistics.median(values)) if values else None,
        "p90": _round(percentile(values, 0.9)),
        "p99": _round(percentile(values, 0.99)),
        "max": _round(max(values)) if values else None,
    }


class Chaos(Soak):
    """One chaos run (the soak's processes, ledger and watcher, and more faults)."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.faults: list[Fault] = []
        self.beats: list[ManagedProcess] = []
        self.slots = args.workers * args.concurrency
        self.occupancy: list[int] = []  # step leases held by live workers, per sample
        self.live_occupancy: list[float] = []  # the same, over the slots of live workers
        self.backlog: list[int] = []  # runnable tasks not leased, per sample
        self.timer_seen: dict[str, datetime] = {}  # sleeping task -> its wake_at
        self.timer_lateness: list[float] = []
        self.answered: dict[str, float] = {}  # approval task -> when the driver answered
        self.answer_errors: Counter[str] = Counter()
        self.submitted = 0
        self.stop_driving = threading.Event()
        self.tarpit_tasks: list[str] = []
        self.loadavg: list[tuple[float, float, float]] = []
        self.db_down = threading.Event()  # the driver's own reads pause meanwhile
        self.ticks_done = 0  # kills made (each after its half-tick's server fault)

    # --- set-up: servers of the run's own -----------------------------------------------------

    def start_servers(self) -> None:
        given = {k: os.environ.pop(k) for k in ("DATABASE_URL", "REDIS_URL") if k in os.environ}
        try:
            super().start_servers()  # embedded, since neither URL is set
        finally:
            os.environ.update(given)  # (a test process may run other tests afterwards)
        with self.engine.begin() as conn:
            self.slow_tenant = tenants.create(conn, f"chaos-tarpit-{uuid.uuid4().hex[:8]}")
        self.env.update(
            {
                "OUTLAST_WEBHOOK_TIMEOUT_SECONDS": str(WEBHOOK_TIMEOUT),
                "OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT": str(TARPIT_CAP),
                "OUTLAST_WEBHOOK_MAX_ATTEMPTS": "15",
                # The driver's own polling would count against the API key's limit.
                "OUTLAST_RATE_LIMIT_PER_SECOND": "0",
            }
        )

    def spawn(self, name: str) -> ManagedProcess:
        proc = super().spawn(name)
        if name == "beat":
            self.beats.append(proc)
        return proc

    # --- the workload ------------------------------------------------------------------------

    def task_spec(self, i: int) -> dict[str, Any]:
        kind = self.rng.choices(
            ["calls", "echo", "sleepy", "approval", "deadline"], weights=[55, 28, 8, 6, 3]
        )[0]
        if kind in ("calls", "echo", "sleepy"):
            body = super().task_spec(i)
            while body["agent"] != kind:  # the soak's own mix, forced to this kind
                body = super().task_spec(i)
            return body
        if kind == "approval":
            body = {"agent": "approval", "input": {"question": f"chaos {i}: go on?"}}
        else:  # a timer longer than the task's deadline: must fail with timeout on time
            body = {"agent": "sleepy", "input": {"seconds": 60}, "timeout_seconds": 4}
        if self.rng.random() < 0.3:
            body["webhook_url"] = self.ledger.url + "/hooks"
        return body

    def runnable_count(self) -> int | None:
        """Tasks a step slot could take now (running or queued): not sleeping, not
        waiting for an answer."""
        if self.db_down.is_set():
            return None
        try:
            with self.engine.connect() as conn:
                return conn.execute(
                    sa.text(
                        "SELECT count(*) FROM tasks WHERE tenant_id = :t "
                        "AND status IN ('pending', 'working') AND wake_at IS NULL"
                    ),
                    {"t": self.tenant.tenant_id},
                ).scalar_one()
        except Exception:
            return None

    def submit_all(self) -> None:
        """Closed loop: keep ``slots + backlog`` tasks runnable until ``--tasks`` are in."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.tenant.api_key}"
        target = self.slots + self.args.backlog
        i = 0
        while i < self.args.tasks and not self.stop_driving.is_set():
            runnable = self.runnable_count()
            if runnable is None or runnable >= target:
                time.sleep(0.2)
                continue
            for _ in range(min(target - runnable, self.args.tasks - i)):
                self.submit_one(session, i, self.task_spec(i), f"chaos-{i}", tries=120)
                i += 1
            self.submitted = i
        self.submitted = i

    def tarpit_loop(self) -> None:
        """The other tenant: an echo task every few seconds, its webhooks to the tarpit."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.slow_tenant.api_key}"
        n = 0
        while not self.stop_driving.wait(self.args.tarpit_every):
            body = {
                "agent": "echo",
                "input": {"message": f"tarpit {n}"},
                "webhook_url": self.tarpit.url,
            }
            try:
                response = session.post(
                    self.base_url + "/v1/tasks",
                    json=body,
                    headers={"Idempotency-Key": f"tarpit-{n}"},
                    timeout=15,
                )
            except requests.RequestException:
                continue  # the same key is tried again next time
            if response.status_code == 202:
                self.tarpit_tasks.append(response.json()["id"])
                n += 1

    def answer_loop(self) -> None:
        """The human: answers every approval task a second or two after it asks."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.tenant.api_key}"
        asked_at: dict[str, float] = {}
        while not self.stop_monitor.wait(0.5):
            if self.db_down.is_set():
                continue
            try:
                with self.engine.connect() as conn:
                    waiting = conn.execute(
                        sa.text(
                            "SELECT id FROM tasks WHERE tenant_id = :t "
                            "AND status = 'input_required'"
                        ),
                        {"t": self.tenant.tenant_id},
                    ).scalars()
                    waiting = list(waiting)
            except Exception:
                continue
            now = time.monotonic()
            for task_id in waiting:
                asked_at.setdefault(task_id, now)
                if now - asked_at[task_id] < 1.0:
                    continue
                try:
                    response = session.post(
                        f"{self.base_url}/v1/tasks/{task_id}/input",
                        json={"input": {"approved": True, "comment": "chaos driver"}},
                        timeout=10,
                    )
                except requests.RequestException as exc:
                    self.answer_errors[type(exc).__name__] += 1
                    continue
                if response.status_code in (200, 202):
                    self.answered.setdefault(task_id, now)
                else:
                    self.answer_errors[str(response.status_code)] += 1

    # --- the faults --------------------------------------------------------------------------

    def calls_in_progress(self) -> dict[str, str | None]:
        """Calls started and not logged complete, and calls in flight at the ledger."""
        found: dict[str, str | None] = {r.key: r.task_id for r in self.ledger.in_flight("/calls")}
        if not self.db_down.is_set():
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(
                        sa.text(
                            "SELECT idempotency_key, task_id FROM tool_calls "
                            "WHERE status = 'started'"
                        )
                    ).all()
                found.update({r.idempotency_key: r.task_id for r in rows})
            except Exception:
                pass
        return found

    def schedule(self) -> dict[int, str]:
        """Half-tick number -> the server fault made then (one cycle of ``--cycle`` kills)."""
        n = max(5, self.args.cycle)
        plan = {}
        for fraction, kind in (
            (0.2, "beat_restart"),
            (0.4, "redis"),
            (0.55, "beat_overlap"),
            (0.7, "beat_overlap_end"),
            (0.85, "postgres"),
        ):
            slot = max(1, round(n * fraction))
            while slot in plan:
                slot += 1
            plan[slot] = kind
        return plan

    def fault_loop(self) -> None:
        """A kill every ``kill_every`` s; the cycle's server faults half-way between kills."""
        plan = self.schedule()
        cycle = max(5, self.args.cycle) + 1
        tick = 0
        half = self.args.kill_every / 2
        while True:
            tick += 1
            if self.stop_killing.wait(half):
                return
            kind = plan.get(tick % cycle if self.args.repeat_cycle else tick)
            if kind:
                self.server_fault(kind)
            if self.stop_killing.wait(half):
                return
            self.kill_worker()
            self.ticks_done = tick

    def kill_worker(self) -> None:
        live = [w for w in self.workers if w.alive()]
        if not live:
            return
        victim = self.rng.choice(live)
        try:
            leased = {} if self.db_down.is_set() else self.leased_now()
        except Exception:
            leased = {}
        interrupted = self.calls_in_progress()
        at = time.monotonic()
        victim.kill()
        interrupted.update(self.calls_in_progress())
        try:  # and leases taken between the first look and the kill
            leased.update({} if self.db_down.is_set() else self.leased_now())
        except Exception:
            pass
        self.workers.remove(victim)
        fault = Fault(at, "kill", victim.name, interrupted=interrupted, leased=leased)
        self.faults.append(fault)
        self.kills.append(fault)  # the soak's monitor times the resumptions
        self.spawn("worker")
        self.say(f"SIGKILLed {victim.name} ({len(leased)} live leases system-wide)")

    def server_fault(self, kind: str) -> None:
        at = time.monotonic()
        fault = Fault(at, kind)
        if kind == "beat_restart":
            old = self.beats.pop(0)
            old.kill()
            new = self.spawn("beat")
            fault.detail = f"SIGKILLed {old.name}, started {new.name}"
        elif kind == "beat_overlap":
            new = self.spawn("beat")
            fault.detail = f"started {new.name} beside {self.beats[0].name}"
        elif kind == "beat_overlap_end":
            old = self.beats.pop(0)
            old.kill()
            fault.detail = f"SIGKILLed {old.name}; {self.beats[0].name} goes on alone"
        elif kind == "redis":
            fault.interrupted = self.calls_in_progress()
            self._redis.stop()
            time.sleep(self.args.redis_down)
            self._redis.start()
            fault.down_s = time.monotonic() - at
            fault.detail = f"Redis on port {self._redis.port} stopped and started again"
        elif kind == "postgres":
            fault.interrupted = self.calls_in_progress()
            self.db_down.set()
            try:
                self._pg.stop()
                fault.interrupted.update(
                    {r.key: r.task_id for r in self.ledger.in_flight("/calls")}
                )
                time.sleep(self.args.pg_down)
                self._pg.start()
            finally:
                self.db_down.clear()
            fault.down_s = time.monotonic() - at
            fault.interrupted.update(self.calls_in_progress())
            fault.detail = f"PostgreSQL in {self._pg.data_dir} stopped and started again"
        self.faults.append(fault)
        self.say(f"{kind}: {fault.detail}" + (f" ({fault.down_s:.1f} s)" if fault.down_s else ""))

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    # --- the monitor -------------------------------------------------------------------------

    def monitor_loop(self) -> None:
        """The soak's monitor (resumptions, idle stretches, queues) plus reap times,
        slot occupancy and timer lateness."""
        sampler = threading.Thread(target=self.sample_loop, daemon=True)
        sampler.start()
        super().monitor_loop()
        sampler.join(5)

    def sample_loop(self) -> None:
        while not self.stop_monitor.wait(0.5):
            if self.db_down.is_set():
                continue
            try:
                self.sample_slots_and_timers()
                self.sample_reaps()
            except Exception:
                continue
            if len(self.loadavg) < 100000:
                self.loadavg.append(os.getloadavg())

    def sample_slots_and_timers(self) -> None:
        # Held by a live worker: renewed within lease/3 + 1 s (a killed worker's leases
        # drop out of the count 1-2 s after the kill, long before they expire).
        fresh = self.args.lease - self.args.lease / 3 - 1.0
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE lease_token IS NOT NULL AND "
                    "  lease_expires_at > now() + make_interval(secs => :fresh)) AS held, "
                    "count(*) FILTER (WHERE lease_token IS NULL AND wake_at IS NULL "
                    "  AND status IN ('pending', 'working')) AS waiting "
                    "FROM tasks WHERE status IN ('pending', 'working')"
                ),
                {"fresh": fresh},
            ).one()
            live = conn.execute(
                sa.text("SELECT count(*) FROM worker_heartbeats WHERE live_until > now()")
            ).scalar_one()
            sleeping = dict(
                conn.execute(
                    sa.text(
                        "SELECT id, wake_at FROM tasks WHERE wake_at IS NOT NULL "
                        "AND agent = 'sleepy' AND status = 'working'"
                    )
                ).all()
            )
            now = conn.execute(sa.text("SELECT now()")).scalar_one()
        if self.submitted and self.submitted < self.args.tasks:  # the saturated phase
            self.occupancy.append(row.held)
            self.backlog.append(row.waiting)
            live_slots = min(self.args.workers, live) * self.args.concurrency
            if live_slots:
                self.live_occupancy.append(min(1.0, row.held / live_slots))
        for task_id, wake_at in list(self.timer_seen.items()):
            if task_id not in sleeping:
                del self.timer_seen[task_id]
                if wake_at <= now:  # fired (a cancelled or timed-out sleeper is not)
                    self.timer_lateness.append((now - wake_at).total_seconds())
        self.timer_seen.update(sleeping)

    def sample_reaps(self) -> None:
        """When each victim's attempt grew: the reaper's share of the recovery."""
        watching = [k for k in self.faults if k.victims and len(k.reaped) < len(k.victims)]
        if not watching:
            return
        ids = list({t for k in watching for t in k.victims})
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, attempt, status::text AS status FROM tasks WHERE id = ANY(:i)"),
                {"i": ids},
            ).all()
        now = time.monotonic()
        by_id = {r.id: r for r in rows}
        for kill in watching:
            for task_id in kill.victims - set(kill.reaped):
                row = by_id.get(task_id)
                if row is not None and row.attempt > kill.leased[task_id][1]:
                    kill.reaped[task_id] = now - kill.at

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        self.start_servers()
        self.ledger = Ledger()
        self.fail_a_third_of_hooks()
        self.tarpit = Tarpit()
        self.spawn("web")
        self.spawn("beat")
        for _ in range(args.workers):
            self.spawn("worker")
        self.wait_ready()
        self.watcher = StatusWatcher(interval=0.5, api_interval=1.0).start(
            self.database_url, self.base_url, self.tenant.api_key
        )
        self.t0 = time.monotonic()
        threads = {
            "faults": threading.Thread(target=self.fault_loop, daemon=True),
            "monitor": threading.Thread(target=self.monitor_loop, daemon=True),
            "answers": threading.Thread(target=self.answer_loop, daemon=True),
            "tarpit": threading.Thread(target=self.tarpit_loop, daemon=True),
        }
        for t in threads.values():
            t.start()
        submitter = threading.Thread(target=self.submit_all, daemon=True)
        submitter.start()
        # Faults go on while the slots are kept busy, and for at least one whole cycle.
        while submitter.is_alive() or self.ticks_done < max(5, args.cycle) + 1:
            submitter.join(1)
        self.stop_killing.set()
        threads["faults"].join(60)
        self.stop_driving.set()
        last_fault = time.monotonic()
        self.say(f"faults stopped ({len(self.faults)}); waiting for every task")
        deadline = last_fault + args.grace
        while time.monotonic() < deadline and (
            self.active_count() > 0 or self.undelivered_hooks() > 0
        ):
            time.sleep(1)
        time.sleep(3)  # late webhook retries
        self.stop_monitor.set()
        for name in ("monitor", "answers", "tarpit"):
            threads[name].join(15)
        self.watcher.stop()
        self.ended_wall = datetime.now(UTC)
        return self.report(time.monotonic() - self.t0)

    def fail_a_third_of_hooks(self) -> None:
        """The ledger answers 500 to every third webhook attempt (whatever the event)."""
        counter = iter(range(10**9))
        guard = threading.Lock()

        def third(request: Request) -> bool:
            if not request.path.startswith("/hooks"):
                return False
            with guard:
                return next(counter) % 3 == 2

        self.ledger.add_rule(third, status=500)

    def undelivered_hooks(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT count(*) FROM webhook_deliveries WHERE tenant_id = :t "
                    "AND status <> 'delivered'"
                ),
                {"t": self.tenant.tenant_id},
            ).scalar_one()

    # --- the verdict -------------------------------------------------------------------------

    def report(self, elapsed: float) -> dict[str, Any]:
        base = super().report(elapsed)
        kills = [f for f in self.faults if f.kind == "kill"]
        promise = self.args.lease + self.args.reaper + 2
        # Tool calls: a key made more than once is excused only when a fault interrupted
        # that very call: a kill of the worker holding its task's lease, or a database
        # restart while it was started and not yet logged complete.
        counts = self.ledger.counts("/calls")
        excused: dict[str, str] = {}
        for f in self.faults:
            for key, task_id in f.interrupted.items():
                if f.kind == "kill" and task_id not in (f.victims or set()):
                    continue
                excused.setdefault(key, f.kind)
        # A database restart also cuts calls answered just before or while it stopped:
        # their completion could not be logged, so the step's retry makes them again.
        for f in self.faults:
            if f.kind != "postgres":
                continue
            for r in self.ledger.snapshot("/calls"):
                if r.answered is not None and f.at - 0.5 <= r.answered <= f.at + f.down_s:
                    excused.setdefault(r.key, "postgres")
        repeated = {k: n for k, n in counts.items() if n > 1}
        duplicated = {k: n for k, n in repeated.items() if k not in excused}
        over_twice = {k: n for k, n in repeated.items() if n > 2}
        with self.engine.connect() as conn:
            deliveries = conn.execute(
                sa.text(
                    "SELECT d.event_id, d.tenant_id, d.status::text AS status, d.attempts, d.url "
                    "FROM webhook_deliveries d"
                )
            ).all()
            deadlines = conn.execute(
                sa.text(
                    "SELECT extract(epoch FROM finished_at - deadline_at) AS late "
                    "FROM tasks WHERE error->>'type' = 'timeout'"
                )
            ).scalars()
            deadline_lateness = [float(x) for x in deadlines]
            attempts = conn.execute(
                sa.text("SELECT id, attempt FROM tasks WHERE tenant_id = :t AND attempt > 1"),
                {"t": self.tenant.tenant_id},
            ).all()
            retried = conn.execute(
                sa.text(
                    "SELECT task_id, extract(epoch FROM created_at) AS at FROM events "
                    "WHERE type = 'task.retrying' AND task_id = ANY(:ids)"
                ),
                {"ids": [r.id for r in attempts]},
            ).all()
        # Webhooks to the ledger: each event delivered (2xx); twice only when a fault
        # cut the recording of the first 2xx (same webhook-id: once in effect).
        hooks = self.ledger.snapshot("/hooks")
        ok_by_event: dict[str, list[Request]] = defaultdict(list)
        for r in hooks:
            if r.status is not None and 200 <= r.status < 300:
                ok_by_event[r.key].append(r)
        ours = [d for d in deliveries if d.tenant_id == self.tenant.tenant_id]
        not_delivered = [d.event_id for d in ours if d.status != "delivered"]
        no_2xx = [d.event_id for d in ours if not ok_by_event.get(d.event_id)]
        unknown = sorted(set(ok_by_event) - {d.event_id for d in ours})
        twice_excused, twice_unexplained = [], []
        for event_id, oks in ok_by_event.items():
            if len(oks) < 2:
                continue
            first = oks[0]
            cut = any(
                f.kind in ("kill", "postgres", "redis")
                and first.arrived - 0.5 <= f.at <= (first.answered or first.arrived) + 5
                for f in self.faults
            )
            (twice_excused if cut else twice_unexplained).append(event_id)
        # The tarpit tenant: each send cut at the timeout, never more than the cap at once:
        # as the sender recorded its attempts ([claimed, claimed + duration]: a send is
        # claimed only after the previous one's outcome was recorded, so this never shows
        # an overlap that did not happen), and as the tarpit saw its sockets (which notices
        # a closed one at its next poll, late when this process is starved).
        with self.engine.connect() as conn:
            intervals = conn.execute(
                sa.text(
                    "SELECT extract(epoch FROM a.attempted_at) AS start, a.duration_ms "
                    "FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id "
                    "WHERE d.tenant_id = :t AND a.duration_ms IS NOT NULL"
                ),
                {"t": self.slow_tenant.tenant_id},
            ).all()
        # (attempted_at is the claim's transaction start, a few ms before its capacity
        # check: each interval is shortened by 0.1 s so that this slack is not counted
        # as an overlap; a real one would last for most of an attempt.)
        edges = sorted(
            [(float(r.start), 1) for r in intervals]
            + [(float(r.start) + r.duration_ms / 1000 - 0.1, -1) for r in intervals],
            key=lambda e: (e[0], e[1]),
        )
        open_now = sender_max = 0
        for _at, delta in edges:
            open_now += delta
            sender_max = max(sender_max, open_now)
        longest_ms = max((r.duration_ms for r in intervals), default=None)
        now = time.monotonic()
        tarpit_conns = [
            c.seconds if c.seconds is not None else now - c.accepted
            for c in self.tarpit.connections
        ]
        slow = [d for d in deliveries if d.tenant_id == self.slow_tenant.tenant_id]
        # Attempts beyond the first that no kill explains (a lease lost some other way).
        victims = set().union(*((k.victims or set()) for k in kills))
        unexplained_attempts = [r.id for r in attempts if r.id not in victims]
        after_fault: Counter[str] = Counter()  # the fault each unexplained retry followed
        for r in retried:
            if r.task_id not in victims:
                before = [f for f in self.faults if f.wall <= float(r.at)]
                after_fault[before[-1].kind if before else "none"] += 1
        resumed = [s for k in kills for s in k.resumed.values()]
        reaped = [s for k in kills for s in k.reaped.values()]
        occ = self.occupancy
        loads = self.loadavg
        chaos = {
            "date_utc": self.ended_wall.strftime("%Y-%m-%d %H:%M UTC"),
            "settings_extra": {
                "cycle_kills": self.args.cycle,
                "backlog": self.args.backlog,
                "slots": self.slots,
                "pg_down_s": self.args.pg_down,
                "redis_down_s": self.args.redis_down,
                "webhook_timeout_s": WEBHOOK_TIMEOUT,
                "tarpit_cap": TARPIT_CAP,
            },
            "faults": Counter(f.kind for f in self.faults),
            "timeline": [
                {
                    "at_s": round(f.at - self.t0, 1),
                    "kind": f.kind,
                    "detail": f.detail,
                    **({"down_s": round(f.down_s, 1)} if f.down_s else {}),
                    **(
                        {
                            "interrupted": len(f.victims or ()),
                            "resumed_after_s": sorted(_round(v) for v in f.resumed.values()),
                        }
                        if f.kind == "kill"
                        else {}
                    ),
                }
                for f in self.faults
            ],
            "promise_s": promise,
            "recovery_resumed_s": _pctl(resumed),
            "recovery_reaped_s": _pctl(reaped),
            "recoveries_over_promise": sum(1 for s in resumed if s > promise),
            "slot_occupancy": {
                "samples": len(occ),
                "mean": _round(statistics.mean(occ) / self.slots) if occ else None,
                "all_busy_share": _round(sum(1 for n in occ if n >= self.slots) / len(occ))
                if occ
                else None,
                "runnable_waiting_mean": _round(statistics.mean(self.backlog))
                if self.backlog
                else None,
                "mean_of_live_workers_slots": _round(statistics.mean(self.live_occupancy))
                if self.live_occupancy
                else None,
            },
            "timer_lateness_s": _pctl(self.timer_lateness),
            "deadline_lateness_s": _pctl(deadline_lateness),
            "approvals_answered": len(self.answered),
            "answer_errors": dict(self.answer_errors),
            "calls_made": sum(counts.values()),
            "call_keys": len(counts),
            "calls_repeated_after_fault": len(repeated) - len(duplicated),
            "calls_repeated_by_fault_kind": dict(
                Counter(excused[k] for k in repeated if k in excused)
            ),
            "calls_made_more_than_twice": len(over_twice),
            "duplicated_side_effects": len(duplicated),
            "attempts_without_a_kill": len(unexplained_attempts),
            "retries_without_a_kill_by_preceding_fault": dict(after_fault),
            "webhooks": {
                "events": len(ours),
                "attempts_at_ledger": len(hooks),
                "not_delivered": len(not_delivered),
                "delivered_without_a_2xx_seen": len(no_2xx),
                "2xx_for_unknown_events": len(unknown),
                "2xx_twice_after_a_fault": len(twice_excused),
                "2xx_twice_unexplained": len(twice_unexplained),
            },
            "tarpit": {
                "tasks": len(self.tarpit_tasks),
                "deliveries": len(slow),
                "connections": len(self.tarpit.connections),
                "attempts_recorded": len(intervals),
                "max_in_flight_at_once": sender_max,
                "longest_attempt_s": _round(longest_ms / 1000) if longest_ms else None,
                "max_open_at_once_seen_by_tarpit": self.tarpit.max_open,
                "longest_connection_s": _round(max(tarpit_conns)) if tarpit_conns else None,
                "delivered": sum(1 for d in slow if d.status == "delivered"),
            },
            "load_average_1m": _pctl([x[0] for x in loads]),
            "examples": {
                **base["examples"],
                "duplicated": list(duplicated.items())[:5],
                "hooks_not_delivered": not_delivered[:5],
                "hooks_2xx_twice_unexplained": twice_unexplained[:5],
                "attempts_without_a_kill": unexplained_attempts[:5],
            },
        }
        base.update(chaos)
        base["recovery_s"] = _pctl(resumed)
        base["duplicated_side_effects"] = len(duplicated)
        base["settings"]["mode"] = "chaos"
        base["verdict"] = self.verdict(base)
        return base

    def verdict(self, r: dict[str, Any]) -> dict[str, bool]:
        w, t = r["webhooks"], r["tarpit"]
        return {
            "no_task_lost": r["tasks_lost"] == 0,
            "no_task_stuck": r["stuck_tasks"] == 0,
            "no_duplicated_call": r["duplicated_side_effects"] == 0
            and r["calls_made_more_than_twice"] == 0,
            "no_missing_call": r["completed_calls_tasks_missing_a_call"] == 0,
            "no_status_regression": r["status_violations"] == 0,
            "every_hook_delivered_once_in_effect": w["not_delivered"] == 0
            and w["delivered_without_a_2xx_seen"] == 0
            and w["2xx_for_unknown_events"] == 0
            and w["2xx_twice_unexplained"] == 0,
            "tarpit_cut_and_capped": t["max_in_flight_at_once"] <= TARPIT_CAP
            and (t["longest_attempt_s"] or 0) <= WEBHOOK_TIMEOUT + 2,
            "recovery_p99_within_promise": r["recovery_s"]["p99"] is not None
            and r["recovery_s"]["p99"] <= r["promise_s"],
        }

    def close(self) -> None:
        super().close()
        if hasattr(self, "tarpit"):
            self.tarpit.close()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"servers' data and process logs kept in {self.tmp}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="step slots per worker")
    parser.add_argument("--backlog", type=int, default=2, help="runnable tasks beyond the slots")
    parser.add_argument("--kill-every", type=float, default=20)
    parser.add_argument("--cycle", type=int, default=14, help="kills per cycle of server faults")
    parser.add_argument(
        "--repeat-cycle", action="store_true", help="repeat the server faults every cycle"
    )
    parser.add_argument("--pg-down", type=float, default=2.0, help="seconds PostgreSQL is down")
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis is down")
    parser.add_argument("--tarpit-every", type=float, default=10.0)
    parser.add_argument("--lease", type=float, default=3)
    parser.add_argument("--reaper", type=float, default=1)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--grace", type=float, default=180, help="wait for tasks after faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="WARNING", help="of the stack's processes")
    parser.add_argument("--out", default="bench/results/chaos.json")
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' data and the process logs"
    )
    args = parser.parse_args(argv)
    args.duration = 0  # the soak's setting; the chaos run is closed-loop
    chaos = Chaos(args)
    try:
        result = chaos.run()
    finally:
        chaos.close()
    print(json.dumps(result, indent=2, default=str))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("verdict:", json.dumps(result["verdict"]))
    return 0 if all(result["verdict"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
