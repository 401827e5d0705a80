"""gunicorn hooks of ``outlast web`` (``gunicorn -c python:workers.gunicorn_conf``).

Under the gevent worker class every request is a greenlet; psycopg2 is a C extension
that gevent's monkey-patching cannot reach, so without psycogreen's wait callback one
query would block every greenlet of the process. The callback makes psycopg2 wait for
its socket through gevent (psycopg2's documented coroutine support).
"""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    """In each freshly forked worker, before it loads the app: make psycopg2 cooperative."""
    if type(worker).__module__.startswith("gunicorn.workers.ggevent"):
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
