"""The Python CPU of one step, without Celery's worker around it.

``python -m bench.step_profile`` calls ``app.engine.runner.run_step`` directly, in this
process, for 20 echo tasks x 30 steps (after a warm-up), as a pool process would: the
lease, the agent, the checkpoint, the next step's publish (to a Redis nobody consumes).
It prints this process's CPU time and wall time per step; ``--profile N`` also prints
cProfile's N most expensive functions by their own CPU time (``--sort cumulative``: by
the CPU time in them and in what they call). The profiler roughly triples the step's
cost, so compare shares, not times. It uses ``DATABASE_URL`` and
``REDIS_URL`` when set (a database it creates and drops, Redis database 15, flushed),
else embedded servers in a temporary folder.

Comparing two checkouts: run it in each (``cd other && python -m bench.step_profile``).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.step_floor import Scratch, echo_tasks  # noqa: E402  (the scratch database, its tasks)

DATABASE = "outlast_step_profile"


def measure(tasks: int, steps: int, profile_top: int, sort: str = "tottime") -> None:
    import workers.make_celery  # noqa: F401  (the Celery app that run_step publishes with)
    from app.engine import runner
    from app.store import db, outbox

    logging.disable(logging.INFO)

    def create(count: int) -> list[str]:
        return echo_tasks("profile", count, {"message": "profile", "steps": steps + 10})

    warm = create(5)  # connections, caches, the agent's first import
    for step in range(5):
        for task_id in warm:
            runner.run_step(task_id, step)
    task_ids = create(tasks)
    profiler = cProfile.Profile(time.process_time) if profile_top else None
    outcomes: dict[str, int] = {}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    for step in range(steps):
        for task_id in task_ids:
            outcome = runner.run_step(task_id, step)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if profiler:
        profiler.disable()
    count = tasks * steps
    cpu = (time.process_time() - cpu0) / count * 1000
    wall = (time.perf_counter() - wall0) / count * 1000
    print(f"{count} steps {outcomes}: CPU {cpu:.2f} ms/step, wall {wall:.2f} ms/step")
    if profiler:
        pstats.Stats(profiler).sort_stats(sort).print_stats(profile_top)
    outbox.sent_rows.flush()  # now, while the database is still there (not at exit)
    db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument(
        "--sort", default="tottime", help="the profile's order: tottime or cumulative"
    )
    args = parser.parse_args(argv)
    servers = []
    base_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if not base_url or not redis_url:
        from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis

        folder = Path(tempfile.mkdtemp(prefix="outlast-step-profile-"))
        if not base_url:
            servers.append(EmbeddedPostgres(folder / "pg"))
            base_url = servers[-1].start()
        if not redis_url:
            servers.append(EmbeddedRedis(folder / "redis"))
            redis_url = servers[-1].start()
    redis_db = redis_url.rsplit("/", 1)[0] + "/15"
    try:
        with Scratch(base_url, DATABASE) as scratch:
            scratch.serve_outlast("profile", REDIS_URL=redis_db)
            measure(args.tasks, args.steps, args.profile, args.sort)
    finally:
        import redis

        redis.Redis.from_url(redis_db).flushdb()
        for server in reversed(servers):
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
