"""Worker process hooks: fresh database connections after fork, logging set-up."""

from __future__ import annotations

from celery.signals import setup_logging, worker_process_init

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
