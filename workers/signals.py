"""Worker process hooks: fresh database connections after fork, logging set-up, and
the purge of cancelled time-limit timers in a pool's main process."""

from __future__ import annotations

import heapq
import os
from typing import Any

from celery.signals import setup_logging, worker_process_init, worker_ready

from app.store import db


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    # Pooled connections inherited from the parent belong to the parent.
    db.dispose_after_fork()


@setup_logging.connect
def _configure_logging(**_: object) -> None:
    # Our own logging configuration replaces Celery's (one JSON object per line).
    from app import settings
    from app.ops import logs

    logs.configure(settings.current())


# How often a pool's main process drops the cancelled entries of its timer.
TIMER_PURGE_SECONDS = 30.0


def purge_cancelled_timers(timer: Any) -> int:
    """Drop cancelled entries from a kombu ``Timer``'s heap; returns how many went.

    The prefork pool's main process schedules a soft and a hard time-limit timer for
    every task it hands a child (``outlast.run_step`` has both: 3900 s and 4000 s).
    When the task finishes the timer is cancelled, but kombu only marks the entry: it
    stays in the heap until its time comes, 65 minutes later. So the main process grew
    by ~0.7 KB a step for an hour (at 100 steps/s, about 250 MB), which raw Celery
    without time limits does not. Rebuilding the heap without them bounds it by what
    was cancelled since the last purge.
    """
    queue = timer._queue
    live = [item for item in queue if not item[2].canceled]
    dropped = len(queue) - len(live)
    if dropped:
        queue[:] = live  # in place: the timer's iterator holds this list
        heapq.heapify(queue)
    return dropped


@worker_ready.connect
def _purge_cancelled_timers_repeatedly(sender: Any = None, **_: object) -> None:
    hub = getattr(getattr(sender, "controller", None), "hub", None)
    if hub is not None and getattr(hub, "timer", None) is not None:
        hub.call_repeatedly(TIMER_PURGE_SECONDS, purge_cancelled_timers, hub.timer)


@worker_ready.connect
def _tell_the_supervisor(**_: object) -> None:
    # `outlast worker` starts its second pool once the step pool is ready (so the first
    # "ready." line a worker logs means steps are consumed): one byte on its pipe.
    fd = os.environ.pop("OUTLAST_READY_FD", None)
    if fd:
        try:
            os.write(int(fd), b"r")
            os.close(int(fd))
        except (OSError, ValueError):
            pass
