"""The Celery tasks and queues, by name: the one place that names them.

The outbox writes messages under these names, ``tasks/`` declares its Celery tasks
with them, and ``workers/`` routes and schedules them. Agent steps, webhook sends and
maintenance sweeps each get their own queue, so a slow receiver or a long sweep never
starves agents.

Steps are routed by agent version (V2.md section 7): the step of a task pinned to
``(agent, version)`` goes to its own queue, :func:`step_queue`, which only workers that
can run or migrate from that version consume (they subscribe from their registry at
start). A step no running worker can take waits in its queue, untouched, until one
starts. ``steps`` is still consumed by every step worker: messages published there by
code older than the routing are run or re-routed to their version's queue.
"""

from __future__ import annotations

from typing import Any

STEPS_QUEUE = "steps"
WEBHOOKS_QUEUE = "webhooks"
MAINTENANCE_QUEUE = "maintenance"
QUEUES = (STEPS_QUEUE, WEBHOOKS_QUEUE, MAINTENANCE_QUEUE)

# Prefix of the per-version step queues: ``steps:<agent>@<version>``.
STEP_QUEUE_PREFIX = STEPS_QUEUE + ":"


def step_queue(agent: str, version: str) -> str:
    """The queue of steps of tasks pinned to ``agent`` at ``version``."""
    return f"{STEP_QUEUE_PREFIX}{agent}@{version}"


RUN_STEP = "outlast.run_step"
# A step's soft time limit fails it; the hard limit kills the pool child (the lease then
# expires and the reaper resumes the task).
STEP_SOFT_TIME_LIMIT = 3900
STEP_TIME_LIMIT = 4000
DELIVER_WEBHOOK = "outlast.deliver_webhook"

# The beat's sweeps (routed to the maintenance queue).
SWEEP_REAP = "outlast.sweep.reap"
SWEEP_RELAY_OUTBOX = "outlast.sweep.relay_outbox"
SWEEP_WAKE_TIMERS = "outlast.sweep.wake_timers"
SWEEP_WAKE_PARENTS = "outlast.sweep.wake_parents"
SWEEP_EXPIRE_DEADLINES = "outlast.sweep.expire_deadlines"
SWEEP_REDISPATCH_LOST = "outlast.sweep.redispatch_lost"
SWEEP_WEBHOOKS = "outlast.sweep.webhooks"
SWEEP_EXPIRE_KEYS = "outlast.sweep.expire_keys"
SWEEP_PURGE = "outlast.sweep.purge"

ROUTES = {
    RUN_STEP: {"queue": STEPS_QUEUE},
    DELIVER_WEBHOOK: {"queue": WEBHOOKS_QUEUE},
    "outlast.sweep.*": {"queue": MAINTENANCE_QUEUE},
}


def message_labels(
    task_name: str, args: list[Any], agent: str | None, version: str | None = None
) -> dict[str, str]:
    """Publish options that make a step readable in Flower: the name says which agent
    and version (``outlast.run_step[echo@1]``, bounded, so Flower's per-name counts stay
    useful) and the args which task and step. The worker still runs ``outlast.run_step``."""
    if task_name == RUN_STEP and agent and len(args) >= 2:
        label = f"{agent}@{version}" if version else agent
        return {"shadow": f"{task_name}[{label}]", "argsrepr": f"task {args[0]} step {args[1]}"}
    return {}
