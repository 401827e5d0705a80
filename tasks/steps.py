"""The step runner task (``outlast.run_step``): one message runs one step of one task.

``acks_late`` + ``reject_on_worker_lost``: the message is acknowledged after the step
ran and re-queued if the pool child dies; fencing in :mod:`app.engine.runner` makes a second
delivery harmless. The soft time limit fails the step; the hard limit kills the child,
after which the lease expires and the reaper resumes the task (attempt + 1).
"""

from __future__ import annotations

import time

from celery import shared_task

from app import settings
from app.engine import runner
from app.ops import logs, metrics
from app.store import db_errors, messages
from outlast.backoff import Backoff

# While the database is unreachable the message is retried after 1, 2, 4 ... seconds
# (in the worker's memory; the lost-message sweep covers a worker dying meanwhile). A
# retry that holds the step's lease comes back well within the lease, so that it takes
# the lease over before the reaper would count a lost worker (V2.md 8).
DB_RETRY = Backoff(base=1.0, cap=30.0)


@shared_task(
    name=messages.RUN_STEP,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=messages.STEP_SOFT_TIME_LIMIT,
    time_limit=messages.STEP_TIME_LIMIT,
    ignore_result=True,
    max_retries=None,
)
def run_step(self, task_id: str, step: int, token: str | None = None) -> str:
    """Run step ``step`` of task ``task_id`` unless another execution owns it.
    ``token``: the lease this message held when a database outage interrupted it."""
    started = time.monotonic()
    try:
        outcome = runner.run_step(task_id, int(step), held_token=token)
    except runner.OutageDuringStep as exc:
        raise self.retry(
            exc=exc.__cause__ or exc,
            countdown=_countdown(self.request.retries, held=True),
            kwargs={"token": exc.token},
        ) from exc
    except Exception as exc:
        if db_errors.is_database_unavailable(exc):
            raise self.retry(
                exc=exc,
                countdown=_countdown(self.request.retries, held=token is not None),
                kwargs={"token": token},
            ) from exc
        raise
    if outcome != "skipped":  # a duplicate message ran nothing; the engine bound the agent
        agent = logs.current_context().get("agent", "unknown")
        metrics.step_finished(agent, outcome, time.monotonic() - started)
    return outcome


def _countdown(retries_done: int, *, held: bool) -> float:
    delay = DB_RETRY.delay(retries_done + 1)
    if held:  # a quarter of the lease: several tries before it can expire
        delay = min(delay, settings.current().lease_seconds / 4)
    return delay
