"""``python -m bench.run [--size smoke|small|full] [--only SECTIONS]``: every
measurement beside its baseline, alternating them round by round, with same-run ratios.

Sections (in this order): ``statements`` (statements and commits PostgreSQL receives
per echo step and per submission, for this checkout and the ``--variant``), ``steps`` (step throughput and per-step latency), ``submit``
(submission throughput and p50/p99 at 2 and 16 connections), ``latency`` (one-step
end-to-end vs a raw Celery round trip), ``recovery`` (SIGKILL of a busy worker to the
next checkpoint), ``rss`` (worker memory across many tasks). ``python -m bench.run
scale`` runs the read-latency-at-scale measurement (bench/scale.py) on its own, and
``python -m bench.run profile`` profiles the step hot path (bench/profile.py).

With no DATABASE_URL / REDIS_URL it starts an embedded PostgreSQL and Redis in a
temporary directory; everything it starts is stopped at the end. Results go to
``bench/results/<time>/`` (results.json, report.md, plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.baselines import CeleryBaseline, DBOSBaseline, NaiveWeb
from bench.infra import ROOT, Infra
from bench.loadgen import run_load

SECTIONS = ("statements", "steps", "submit", "latency", "recovery", "rss", "waiters")


@dataclass(frozen=True)
class Size:
    """How much of each section one run does."""

    rounds: int
    chains: int
    steps: int
    alone_repeats: int  # runs of one chain alone per round
    submit_seconds: float
    submit_warmup: float
    submit_rounds: int
    latency_samples: int
    recovery_repeats: int
    rss_tasks: int
    # Rough seconds each section takes on a quiet 2-core machine (for --budget).
    estimate: dict = dataclasses.field(default_factory=dict)


SIZES = {
    # Seconds: the harness itself (tests/bench).
    "smoke": Size(
        rounds=1,
        chains=3,
        steps=3,
        alone_repeats=1,
        submit_seconds=0.5,
        submit_warmup=0.2,
        submit_rounds=1,
        latency_samples=3,
        recovery_repeats=1,
        rss_tasks=30,
    ),
    # A quick look while developing.
    "small": Size(
        rounds=1,
        chains=10,
        steps=20,
        alone_repeats=2,
        submit_seconds=2.0,
        submit_warmup=0.5,
        submit_rounds=1,
        latency_samples=20,
        recovery_repeats=1,
        rss_tasks=500,
    ),
    # The sizes (make bench), within ten minutes on a quiet 2-core machine;
    # worker memory over 10,000 tasks takes longer: --only rss --rss-tasks 10000.
    "full": Size(
        rounds=3,
        chains=50,
        steps=20,
        alone_repeats=3,
        submit_seconds=5.0,
        submit_warmup=1.0,
        submit_rounds=2,
        latency_samples=100,
        recovery_repeats=3,
        rss_tasks=3_000,
        estimate={
            "statements": 60,
            "steps": 150,
            "submit": 80,
            "latency": 20,
            "recovery": 40,
            "rss": 100,
            "waiters": 180,
        },
    ),
}

# Recovery runs with a short lease so that it fits the run (the goal is relative).
RECOVERY_ENV = {"OUTLAST_LEASE_SECONDS": "5", "OUTLAST_REAPER_INTERVAL_SECONDS": "1"}


def rotate(items: list, n: int) -> list:
    """``items`` started at position ``n``: each round puts another contender first."""
    n %= len(items)
    return items[n:] + items[:n]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Run:
    """One benchmark run: the contenders, their processes, and the results."""

    def __init__(
        self,
        size: Size,
        sections: tuple[str, ...],
        outlast: bool,
        variant_root: str | None = None,
        only_contenders: tuple[str, ...] = (),
        budget: float = 1e9,
    ):
        self.size = size
        self.sections = sections
        self.want_outlast = outlast
        self.variant_root = variant_root
        self.only_contenders = only_contenders
        self.budget = budget
        self.results: dict = {"meta": report.machine_meta(), "size": size.__dict__}
        self.infra = Infra(keep_logs=True)
        # "outlast" (this checkout) and, with --variant, "variant" (another checkout).
        self.stacks: dict = {}
        self.celery: CeleryBaseline | None = None
        self.dbos: DBOSBaseline | None = None
        self.failed = False

    # --- set-up ---------------------------------------------------------------------------

    @property
    def outlast(self):
        return self.stacks.get("outlast")

    def start_outlast(self) -> None:
        """Outlast's stack (and the variant's), each checked with one echo task; skipped
        (and said so) if the engine or the API cannot run a task."""
        if not self.want_outlast:
            self.results["outlast_skipped"] = "--no-outlast"
            return
        from bench.outlast_side import OutlastStack

        wanted = {"outlast": None}
        if self.variant_root:
            wanted["variant"] = self.variant_root
        for name, code_root in wanted.items():
            stack = None
            try:
                stack = OutlastStack(self.infra, name=name, code_root=code_root)
                worker = stack.start_worker(wait=False)
                stack.start_beat()
                stack.start_web()
                self.infra.wait_worker_ready(worker)
                task_id = stack.submit({"message": "hello", "steps": 2})
                stack.wait_completed_via_long_poll(task_id, timeout=30)
                stack.reset()
                self.stacks[name] = stack
            except Exception as exc:
                detail = "".join(traceback.format_exception_only(exc)).strip()
                log(f"{name} cannot run a task here; not measured: {detail}")
                self.results[f"{name}_skipped"] = detail
                if stack is not None:
                    stack.stop_workers()
                    if stack.web is not None:
                        self.infra.stop(stack.web)
                    stack.close()

    def time_left(self, floor: float) -> float:
        """Seconds left in the budget (at least ``floor``)."""
        return max(floor, self.budget - (time.monotonic() - self.started))

    def start_workers(self) -> None:
        """The baseline worker and each Outlast's worker and beat, started side by side."""
        started = [self.celery.start_worker(wait=False)]
        for stack in self.stacks.values():
            if not stack.workers:
                started.append(stack.start_worker(wait=False))
                stack.start_beat()
        for worker in started:
            self.infra.wait_worker_ready(worker)

    # --- sections -------------------------------------------------------------------------

    def section_statements(self) -> None:
        """Statements and commits per step and per submission (log_statement=all on the
        embedded server; needs it: skipped with a given DATABASE_URL)."""
        from bench.profile import count_statements

        if self.infra._pg is None:
            self.results["statements_skipped"] = "needs the embedded PostgreSQL"
            return
        counted = {}
        roots = {"outlast": None}
        if self.variant_root:
            roots["variant"] = self.variant_root
        tasks, steps = (2, 5) if self.size.chains < 10 else (5, 20)
        for name, root in roots.items():
            log(f"statements: {name}")
            counted[name] = count_statements(
                self.infra, tasks=tasks, steps=steps, code_root=root, name=f"stmts_{name}"
            )
        self.results["statements"] = counted

    def section_steps(self) -> None:
        s = self.size
        contenders = [*self.stacks, "raw_celery", "pg_checkpoint", "dbos"]
        if self.only_contenders:
            contenders = [c for c in contenders if c in self.only_contenders]
        self.start_workers()
        many: dict[str, list] = {c: [] for c in contenders}
        alone: dict[str, list] = {c: [] for c in contenders}
        self.results["steps"] = {"many": many, "alone": alone}  # filled as rounds finish
        half = max(1, s.chains // 2)
        for r in range(s.rounds):
            for contender in rotate(contenders, r):
                log(f"steps round {r + 1}/{s.rounds}: {contender}")
                if contender == "raw_celery":
                    self.celery.reset()
                    run = lambda n: self.celery.run_chains("bench.raw_step", n, s.steps)  # noqa: E731
                elif contender == "pg_checkpoint":
                    self.celery.reset()
                    run = lambda n: self.celery.run_chains("bench.pg_step", n, s.steps)  # noqa: E731
                elif contender == "dbos":
                    # Two processes, as Outlast's worker has two pool processes.
                    run = lambda n: (  # noqa: E731
                        self.dbos.run(2, half, s.steps) if n > 1 else self.dbos.run(1, 1, s.steps)
                    )
                else:
                    stack = self.stacks[contender]
                    stack.reset()
                    run = lambda n, stack=stack: stack.run_tasks(n, s.steps)  # noqa: E731
                many[contender].append(run(s.chains if contender != "dbos" else 2 * half).as_dict())
                for _ in range(s.alone_repeats):
                    alone[contender].append(run(1).as_dict())
        self.celery.stop_worker()

    def section_submit(self) -> None:
        s = self.size
        for stack in self.stacks.values():
            stack.stop_workers()  # nothing consumes: only the web side is measured
        web = NaiveWeb(self.celery)
        contenders = {"noop": web.noop_request, "naive": web.naive_request}
        ports = {"noop": web.port, "naive": web.port}
        for name, stack in self.stacks.items():
            contenders[name] = stack.submit_request
            ports[name] = stack.port
        names = list(contenders)
        results: dict[str, dict[str, list]] = {}
        try:
            for r in range(s.submit_rounds):
                for connections in (2, 16):
                    for name in rotate(names, r + connections):
                        log(f"submit round {r + 1}/{s.submit_rounds}: {name} x{connections}")
                        result = run_load(
                            ports[name],
                            contenders[name],
                            connections=connections,
                            duration=s.submit_seconds,
                            warmup=s.submit_warmup,
                        )
                        results.setdefault(str(connections), {}).setdefault(name, []).append(
                            result.as_dict()
                        )
        finally:
            web.stop()
        self.celery.reset()
        for stack in self.stacks.values():
            stack.reset()
        self.results["submit"] = results

    def section_latency(self) -> None:
        s = self.size
        self.start_workers()
        samples: dict[str, list[float]] = {"raw_celery": []}
        # Warm every path (connections, imports) outside the timings.
        self.celery.round_trips(3)
        for name, stack in self.stacks.items():
            samples[name] = []
            samples[f"{name}_prefer_wait"] = []
            stack.one_step_latencies(3)
            stack.prefer_wait_latencies(3)
        log(f"latency: {s.latency_samples} samples each, interleaved")
        for _ in range(s.latency_samples):
            samples["raw_celery"] += self.celery.round_trips(1)
            for name, stack in self.stacks.items():
                samples[name] += stack.one_step_latencies(1)
                samples[f"{name}_prefer_wait"] += stack.prefer_wait_latencies(1)
        self.celery.stop_worker()
        self.results["latency"] = samples

    def section_recovery(self) -> None:
        if self.outlast is None:
            return
        stack = self.outlast
        stack.stop_workers()
        stack.reset()
        stack.start_worker(RECOVERY_ENV)
        stack.start_beat(RECOVERY_ENV)
        runs = []
        missed = 0
        while len(runs) < self.size.recovery_repeats and missed < 2 * self.size.recovery_repeats:
            log(f"recovery {len(runs) + 1}/{self.size.recovery_repeats}")
            recovery = stack.recover_once(worker_env=RECOVERY_ENV)
            if recovery.hit_the_busy_worker:
                runs.append(recovery.as_dict())
            else:
                missed += 1
                log("the killed worker was the idle one (the step ran on the other); again")
        stack.stop_workers()
        stack.reset()
        self.results["recovery"] = {
            "lease_seconds": float(RECOVERY_ENV["OUTLAST_LEASE_SECONDS"]),
            "reaper_interval_seconds": float(RECOVERY_ENV["OUTLAST_REAPER_INTERVAL_SECONDS"]),
            "runs": runs,
            "kills_of_the_idle_worker": missed,
        }

    def section_rss(self) -> None:
        total = self.size.rss_tasks
        rss: dict[str, list] = {}
        if self.outlast is not None:
            stack = self.outlast
            stack.stop_workers()
            stack.reset()
            stack.start_worker()
            stack.start_beat()
            log(f"rss: {total} Outlast tasks")
            rss["outlast"] = stack.rss_over_tasks(total, timeout=self.time_left(60))
            stack.stop_workers()
            stack.reset()
        self.celery.reset()
        self.celery.start_worker()
        log(f"rss: {total} raw Celery tasks")
        rss["raw_celery"] = self.celery.rss_over_tasks(total, timeout=self.time_left(30))
        self.celery.stop_worker()
        self.results["rss"] = rss

    def section_waiters(self) -> None:
        from bench.waiters import WAITER_SIZES, measure_waiters

        size = WAITER_SIZES[self.results["meta"].get("size", "full")]
        self.results["waiters"] = measure_waiters(self.infra, size, log)

    # --- the whole run --------------------------------------------------------------------

    def run(self) -> dict:
        started = self.started = time.monotonic()
        try:
            self.celery = CeleryBaseline(self.infra)
            if "steps" in self.sections and (
                not self.only_contenders or "dbos" in self.only_contenders
            ):
                self.dbos = DBOSBaseline(self.infra)
            self.start_outlast()
            for section in SECTIONS:
                if section in self.sections:
                    elapsed = time.monotonic() - started
                    if elapsed + self.size.estimate.get(section, 0) > self.budget:
                        log(
                            f"{section} skipped: {elapsed:.0f}s used of a {self.budget:.0f}s budget"
                        )
                        self.results.setdefault("skipped_sections", []).append(section)
                        continue
                    t0 = time.monotonic()
                    getattr(self, f"section_{section}")()
                    log(f"{section} took {time.monotonic() - t0:.0f}s")
        except BaseException:
            self.failed = True
            log(f"benchmark failed; process logs kept in {self.infra.log_dir}")
            raise
        finally:
            for stack in self.stacks.values():
                stack.close()
            if self.celery is not None:
                self.celery.close()
            self.infra.keep_logs = self.failed
            self.infra.close()
        self.results["meta"]["seconds"] = time.monotonic() - started
        return self.results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "scale":
        from bench import scale

        return scale.main(argv[1:])
    if argv and argv[0] == "profile":
        from bench import profile

        return profile.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}"
    )
    parser.add_argument("--no-outlast", action="store_true", help="measure the baselines only")
    parser.add_argument(
        "--variant",
        default=None,
        metavar="DIR",
        help="another checkout of Outlast to measure beside this one (steps, submit, latency)",
    )
    parser.add_argument(
        "--variant-label",
        default=None,
        metavar="TEXT",
        help="how the report names the --variant (e.g. 'before (4862372)')",
    )
    parser.add_argument(
        "--out", default=None, help="results directory (default bench/results/<time>)"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="override the size's rounds")
    parser.add_argument(
        "--rss-tasks", type=int, default=None, help="override the size's task count for rss"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds: a section that would not fit is skipped (and the report says so)",
    )
    parser.add_argument(
        "--contenders",
        default="",
        help="steps section only: measure just these (outlast,variant,raw_celery,pg_checkpoint,dbos)",
    )
    args = parser.parse_args(argv)
    sections = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    size = SIZES[args.size]
    if args.rounds:
        size = dataclasses.replace(size, rounds=args.rounds, submit_rounds=args.rounds)
    if args.rss_tasks:
        size = dataclasses.replace(size, rss_tasks=args.rss_tasks)
    run = Run(
        size,
        sections,
        outlast=not args.no_outlast,
        variant_root=args.variant,
        only_contenders=tuple(c for c in args.contenders.split(",") if c),
        budget=args.budget,
    )
    results = run.results
    results["meta"]["command"] = "python -m bench.run " + " ".join(argv)
    results["meta"]["size"] = args.size
    if args.variant_label:
        results["meta"]["variant_label"] = args.variant_label
    out.mkdir(parents=True, exist_ok=True)
    try:
        run.run()
    finally:  # a failed run still leaves what it measured
        (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report.render(results)
    if "waiters" in results:
        from bench.waiters import render

        text += "\n" + render(results["waiters"])
    (out / "report.md").write_text(text)
    print(text)
    if not args.no_plots:
        for path in report.plot(results, out):
            log(f"plot: {path}")
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
