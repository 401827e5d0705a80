"""One ``outlast up`` per var dir: a lock file in it, and a plain word on a busy port.

The lock is an ``flock`` on ``<var>/outlast-up.lock``, which also records the holder's
PID and URL. The kernel drops an ``flock`` when its last descriptor closes, so a lock
left by a dead ``outlast up`` is no lock at all: the next one takes it over. The warden
(``app/dev/warden.py``) inherits the descriptor, so the lock is held until the old
stack's last process is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "outlast-up.lock"


class StackRunning(Exception):
    """Another ``outlast up`` holds the var dir."""

    def __init__(self, var: Path, pid: int | None, url: str | None):
        self.var, self.pid, self.url = var, pid, url
        super().__init__(self.message())

    def message(self) -> str:
        where = _display(self.var)
        if self.pid is not None and not pid_alive(self.pid):
            return (
                f"the previous outlast up in {where} (pid {self.pid}) has ended and its "
                "processes are still stopping; try again in a few seconds."
            )
        who = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        at = f", {self.url}" if self.url else ""
        kill = f"kill {self.pid}" if self.pid is not None else "kill it"
        return (
            f"outlast up is already running in {where} ({who}{at}): use it, or stop it "
            f"first (Ctrl-C in its terminal, or {kill}). Another --var-dir runs a second stack."
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _display(path: Path) -> str:
    try:
        return "./" + str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class StackLock:
    """``<var>/outlast-up.lock``, held for the life of an ``outlast up`` (and its warden)."""

    def __init__(self, var: Path):
        self.var = var
        self.path = var / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict | None = None  # what a stale lock said (its holder is gone)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StackRunning` naming its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._read_holder(wait=1.0)
            raise StackRunning(self.var, holder.get("pid"), holder.get("url")) from None
        self.fd = fd
        self.previous = self._read_holder(wait=0) or None

    def record(self, pid: int, url: str) -> None:
        """Say who holds the lock (read by a second ``outlast up``)."""
        assert self.fd is not None
        data = json.dumps({"pid": pid, "url": url, "since": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """A clean stop: forget the holder (the next start has nothing to take over)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def fileno(self) -> int:
        assert self.fd is not None
        return self.fd

    def _read_holder(self, wait: float) -> dict:
        # The holder writes its PID right after it takes the lock: allow it a moment.
        deadline = time.monotonic() + wait
        while True:
            try:
                holder = json.loads(self.path.read_text() or "{}")
                if isinstance(holder, dict) and holder.get("pid"):
                    return holder
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)


def port_problem(host: str, port: int, what: str = "PORT") -> str | None:
    """A plain sentence when nothing could listen on ``host:port``, else ``None``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As gunicorn binds: a port in TIME_WAIT after the last stack is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                holder = _listener(port)
                by = f" by {holder}" if holder else " by another program"
                return (
                    f"port {port} ({what}) is already in use{by}: stop it, or choose "
                    f"another port (PORT={port + 10} make run, or outlast up --port {port + 10})."
                )
            return f"cannot listen on {host}:{port} ({what}): {exc.strerror}"
    return None


def _listener(port: int) -> str | None:
    """``pid 123 (python3 -m http.server)`` for the process listening on ``port``."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return None
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())[:80]
                return f"pid {conn.pid} ({cmdline})"
    except Exception:  # psutil missing, or not allowed to look: say less
        return None
    return None
