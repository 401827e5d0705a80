"""The baselines' Celery app (``celery -A bench.baseline_app worker``).

It has Outlast's own Celery configuration (acks late, prefetch 1, task events, JSON),
so the only difference from Outlast is what a step does:

- ``bench.raw_step``: a trivial step that enqueues the next one (raw Celery);
- ``bench.pg_step``: the same chain hand-rolled with a PostgreSQL checkpoint per step:
  read the last checkpoint, write the new checkpoint and a log row in one transaction,
  then ``.delay()`` the next step;
- ``bench.ping``: a task whose result the caller waits for (raw Celery round trip);
- ``bench.noop``: what the naive submission endpoint enqueues.

A chain's last step pushes ``{"chain", "finished"}`` onto the Redis list ``DONE_KEY``.
Settings come from ``DATABASE_URL`` / ``REDIS_URL`` through :mod:`app.settings`.
"""

from __future__ import annotations

import json
import time

import redis as redis_lib
import sqlalchemy as sa
from celery import Celery
from celery.signals import worker_process_init

from app import settings as settings_mod
from bench.baseline_schema import BASELINE_SCHEMA, DONE_KEY  # noqa: F401
from workers.celery_app import celery_config


def _make_app() -> Celery:
    settings = settings_mod.current()
    config = celery_config(settings)
    config.update(
        include=[],
        task_routes={},
        task_default_queue="bench",
        beat_schedule={},
        task_ignore_result=True,
    )
    celery_app = Celery("bench")
    celery_app.config_from_object(config)
    return celery_app


app = _make_app()

_engine: sa.Engine | None = None
_redis: redis_lib.Redis | None = None


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    """A pool child opens its own connections (never share them across fork)."""
    global _engine, _redis
    _engine = None
    _redis = None


def engine() -> sa.Engine:
    global _engine
    if _engine is None:
        _engine = sa.create_engine(
            settings_mod.current().require_database_url(), pool_size=4, pool_pre_ping=True
        )
    return _engine


def redis_client() -> redis_lib.Redis:
    global _redis
    if _redis is None:
        _redis = redis_lib.Redis.from_url(settings_mod.current().require_redis_url())
    return _redis


def _finish(chain_id: str) -> None:
    redis_client().rpush(DONE_KEY, json.dumps({"chain": chain_id, "finished": time.time()}))


@app.task(name="bench.raw_step")
def raw_step(chain_id: str, step: int, steps: int, state: int = 0) -> None:
    """One trivial step; enqueues the next until ``steps`` have run."""
    state += 1
    if step + 1 < steps:
        raw_step.delay(chain_id, step + 1, steps, state)
    else:
        _finish(chain_id)


@app.task(name="bench.pg_step")
def pg_step(chain_id: str, step: int, steps: int) -> None:
    """One step checkpointed by hand: read the last checkpoint, write the next one and a
    log row in one transaction, then enqueue the next step."""
    with engine().begin() as conn:
        last = conn.execute(
            sa.text(
                "SELECT state FROM bench_checkpoints WHERE chain_id = :c ORDER BY step DESC LIMIT 1"
            ),
            {"c": chain_id},
        ).scalar()
        state = {"n": (last or {}).get("n", 0) + 1}
        conn.execute(
            sa.text(
                "INSERT INTO bench_checkpoints (chain_id, step, state) "
                "VALUES (:c, :s, CAST(:state AS jsonb))"
            ),
            {"c": chain_id, "s": step, "state": json.dumps(state)},
        )
        conn.execute(
            sa.text("INSERT INTO bench_step_log (chain_id, step) VALUES (:c, :s)"),
            {"c": chain_id, "s": step},
        )
    if step + 1 < steps:
        pg_step.delay(chain_id, step + 1, steps)
    else:
        _finish(chain_id)


@app.task(name="bench.ping", ignore_result=False)
def ping(sent_at: float) -> float:
    """Returns at once; the caller times ``.delay(...).get()``."""
    return sent_at


@app.task(name="bench.noop")
def noop(submission_id: str) -> None:
    """What the naive submission endpoint enqueues (no worker runs during submission)."""
