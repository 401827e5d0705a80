"""Worker process hooks: fresh database connections after fork, logging set-up."""

from __future__ import annotations

import os

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
