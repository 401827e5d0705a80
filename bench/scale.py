"""``python -m bench.run scale [--tasks N --events M]``: read latency with a big table.

Two databases side by side, each with its own ``outlast web`` (gunicorn 2 x 4): a small
one (1,000 tasks, 10,000 events) and a big one (by default 1,000,000 tasks and
10,000,000 events, all in one tenant: the worst case for listing). Rows are made in
PostgreSQL with ``generate_series`` (no Python in the loop); the events table's keys are
built after the load, as a restore would. Then, alternating the sizes, closed-loop
clients read:

- ``GET /v1/tasks/{id}`` (random ids),
- ``GET /v1/tasks?limit=20`` (the first page of the listing),
- ``GET /v1/tasks?status=failed&limit=20`` (a filtered first page),
- ``GET /v1/tasks/{id}/events`` (a random task's event page),

and the p50/p99 of the big size are compared with the small one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from bench import report
from bench.infra import ROOT, Infra
from bench.loadgen import http_request, run_load
from bench.run import log, rotate

EVENT_TYPES = (
    "task.created",
    "task.started",
    "task.progress",
    "task.step.completed",
)


def task_id_sql(i: str) -> str:
    """Ids shaped like ours (``tsk_`` + 26 characters), increasing with ``i``."""
    return f"'tsk_' || lpad(to_hex({i}), 26, '0')"


def task_id(i: int) -> str:
    return "tsk_" + format(i, "x").rjust(26, "0")


def load(engine: sa.Engine, tenant_id: str, tasks: int, events: int) -> float:
    """Insert ``tasks`` tasks and ``events`` events (spread evenly) for ``tenant_id``;
    returns the seconds it took."""
    per_task = max(1, events // tasks)
    started = time.monotonic()
    with engine.connect() as conn:
        conn.exec_driver_sql("SET synchronous_commit = off")
        conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")
        # Completed tasks but every 20th failed; created one second apart, newest last.
        conn.execute(
            sa.text(
                "INSERT INTO tasks (id, tenant_id, agent, status, input, metadata, step, "
                "progress, result, error, attempt, last_seq, created_at, updated_at, "
                "started_at, finished_at) "
                f"SELECT {task_id_sql('i')}, :tenant, 'echo', "
                "CASE WHEN i % 20 = 0 THEN 'failed' ELSE 'completed' END::task_status, "
                "jsonb_build_object('message', 'hello ' || i, 'steps', :per_task), '{}', "
                ":per_task, jsonb_build_object('current', :per_task, 'total', :per_task), "
                "CASE WHEN i % 20 = 0 THEN NULL ELSE "
                "jsonb_build_object('message', 'hello ' || i, 'steps', :per_task) END, "
                "CASE WHEN i % 20 = 0 THEN "
                '\'{"type": "agent_error", "message": "echo was asked to fail"}\'::jsonb '
                "END, 1, :per_task, "
                "now() - make_interval(secs => :tasks - i), "
                "now() - make_interval(secs => :tasks - i), "
                "now() - make_interval(secs => :tasks - i), "
                "now() - make_interval(secs => :tasks - i) + interval '1 second' "
                "FROM generate_series(1, :tasks) AS i"
            ),
            {"tenant": tenant_id, "tasks": tasks, "per_task": per_task},
        )
        conn.commit()
        # The events table's keys are built once after the load (as pg_restore does).
        conn.exec_driver_sql(
            "ALTER TABLE events DROP CONSTRAINT events_pkey, "
            "DROP CONSTRAINT events_id_key, DROP CONSTRAINT events_task_id_fkey"
        )
        conn.execute(
            sa.text(
                "INSERT INTO events (task_id, seq, id, type, data, created_at) "
                f"SELECT {task_id_sql('i')}, s, "
                "'evt_' || lpad(to_hex(i), 20, '0') || lpad(to_hex(s), 6, '0'), "
                "(ARRAY['task.created', 'task.started', 'task.progress', "
                "'task.step.completed'])[LEAST(s, 4)], "
                "jsonb_build_object('task', jsonb_build_object("
                f"'id', {task_id_sql('i')}, 'object', 'task', 'agent', 'echo', "
                "'status', 'working', 'input', jsonb_build_object('message', 'hello ' || i), "
                "'metadata', '{}'::jsonb, 'step', s, "
                "'progress', jsonb_build_object('current', s, 'total', :per_task), "
                "'result', NULL, 'error', NULL, 'input_request', NULL, 'attempt', 1, "
                "'webhook_url', NULL)), "
                "now() - make_interval(secs => :tasks - i) "
                "FROM generate_series(1, :tasks) AS i, generate_series(1, :per_task) AS s"
            ),
            {"tasks": tasks, "per_task": per_task},
        )
        conn.commit()
        conn.exec_driver_sql(
            "ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (task_id, seq), "
            "ADD CONSTRAINT events_id_key UNIQUE (id), "
            "ADD CONSTRAINT events_task_id_fkey FOREIGN KEY (task_id) "
            "REFERENCES tasks (id) ON DELETE CASCADE"
        )
        conn.commit()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE tasks")
        conn.exec_driver_sql("VACUUM ANALYZE events")
    return time.monotonic() - started


def requests_for(stack, tasks: int) -> dict:
    """Request factories per endpoint for a stack whose tenant has ``tasks`` tasks."""
    host = f"127.0.0.1:{stack.port}"
    auth = {"Authorization": f"Bearer {stack.api_key}"}
    rng = random.Random(7)

    def one_task(i: int) -> bytes:
        return http_request("GET", f"/v1/tasks/{task_id(rng.randint(1, tasks))}", host, auth)

    def first_page(i: int) -> bytes:
        return http_request("GET", "/v1/tasks?limit=20", host, auth)

    def failed_page(i: int) -> bytes:
        return http_request("GET", "/v1/tasks?status=failed&limit=20", host, auth)

    def events_page(i: int) -> bytes:
        return http_request("GET", f"/v1/tasks/{task_id(rng.randint(1, tasks))}/events", host, auth)

    return {
        "GET /v1/tasks/{id}": one_task,
        "GET /v1/tasks?limit=20": first_page,
        "GET /v1/tasks?status=failed&limit=20": failed_page,
        "GET /v1/tasks/{id}/events": events_page,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run scale", description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--small-tasks", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from bench.outlast_side import OutlastStack

    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("scale-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    )
    sizes = {
        "small": (args.small_tasks, args.small_tasks * (args.events // args.tasks)),
        "big": (args.tasks, args.events),
    }
    results: dict = {
        "meta": report.machine_meta(),
        "scale": {
            "connections": args.connections,
            "seconds": args.seconds,
            "endpoints": [],
            "sizes": {},
        },
    }
    infra = Infra(keep_logs=True)
    failed = False
    stacks = {}
    try:
        for name, (tasks, events) in sizes.items():
            stack = OutlastStack(infra, name=f"scale_{name}")
            log(f"loading {tasks:,} tasks and {events:,} events into {name} ...")
            seconds = load(stack.engine, stack.tenant_id, tasks, events)
            log(f"{name} loaded in {seconds:.0f}s")
            stack.start_web()
            stacks[name] = stack
            results["scale"]["sizes"][name] = {
                "tasks": tasks,
                "events": events,
                "load_seconds": seconds,
                "results": {},
            }
        factories = {name: requests_for(stacks[name], sizes[name][0]) for name in stacks}
        endpoints = list(factories["small"])
        results["scale"]["endpoints"] = endpoints
        for name in stacks:  # warm the caches of both, outside the timings
            for endpoint in endpoints:
                run_load(
                    stacks[name].port,
                    factories[name][endpoint],
                    connections=2,
                    duration=1.0,
                    warmup=0.2,
                )
        for r in range(args.rounds):
            for endpoint in endpoints:
                for name in rotate(list(stacks), r):
                    log(f"scale round {r + 1}/{args.rounds}: {endpoint} on {name}")
                    result = run_load(
                        stacks[name].port,
                        factories[name][endpoint],
                        connections=args.connections,
                        duration=args.seconds,
                        warmup=0.5,
                    )
                    bad = {k: v for k, v in result.statuses.items() if k != 200}
                    if bad:
                        raise RuntimeError(f"{endpoint} on {name} answered {bad}")
                    results["scale"]["sizes"][name]["results"].setdefault(endpoint, []).append(
                        result.as_dict()
                    )
        with stacks["big"].engine.connect() as conn:
            results["scale"]["big_table_bytes"] = {
                t: conn.execute(sa.text(f"SELECT pg_total_relation_size('{t}')")).scalar_one()
                for t in ("tasks", "events")
            }
    except BaseException:
        failed = True
        log(f"scale benchmark failed; logs kept in {infra.log_dir}")
        raise
    finally:
        for stack in stacks.values():
            stack.close()
        infra.keep_logs = failed
        infra.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report.render_scale(results["scale"])
    (out / "report.md").write_text(text)
    print(text)
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
