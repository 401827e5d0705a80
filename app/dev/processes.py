"""Child processes in their own process groups, stopped as a whole.

Used by ``outlast up`` (web, worker and beat in the foreground) and by the test suite's
process harness (the Procfile's lines as real subprocesses, killed on purpose).
:class:`Warden` starts ``app/dev/warden.py``, which stops ``outlast up``'s processes if
``outlast up`` dies without doing it itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from app.dev.warden import group_members


class ManagedProcess:
    """One command running in a new session (so its whole process tree is one group)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: str | Path | None = None,
        on_fork: Callable[[], None] | None = None,
    ):
        """``on_fork`` runs in the child between ``fork`` and ``exec`` (in its new
        session): :meth:`Warden.registrar` registers the child there."""
        self.name = name
        self.on_fork = on_fork
        self.argv = argv
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ManagedProcess:
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
            out = self._log
        self.process = subprocess.Popen(
            self.argv,
            shell=isinstance(self.argv, str),
            env=self.env,
            cwd=self.cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=self.on_fork,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process of the group (ignored if it is gone)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, not a shutdown) and reap it."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        self._wait_group_gone(5.0)

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the group to stop with ``sig``; SIGKILL whatever is left after ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal_group(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.process.wait()
        # Children of the leader (pool processes) may outlive it for a moment.
        if not self._wait_group_gone(timeout):
            self.signal_group(signal.SIGKILL)
            self._wait_group_gone(5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not group_members(self.process.pid):
                return True
            time.sleep(0.05)
        return False

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


def stop_all(processes: Sequence[ManagedProcess], timeout: float = 25.0) -> None:
    """Signal every process first, then wait for each: they shut down in parallel."""
    for proc in processes:
        if proc.alive():
            proc.signal_group(signal.SIGTERM)
    for proc in processes:
        proc.stop(timeout=timeout)


class Warden:
    """The warden of ``outlast up``'s processes (see ``app/dev/warden.py``).

    Started before anything else, in its own session; ``registrar(kind)`` gives the
    ``on_fork`` hook that registers a child from inside it, so a child exists only
    registered. :meth:`stop_everything` has it stop them all, in order; when ``outlast up`` dies
    instead (even by ``kill -9``), the end of the pipe does the same.
    """

    SCRIPT = Path(__file__).with_name("warden.py")

    def __init__(self, grace: float, keep_fds: Sequence[int] = ()):
        read_end, self._write_end = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(self.SCRIPT), str(grace)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=tuple(keep_fds),
        )
        os.close(read_end)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _send(self, line: str) -> None:
        try:
            os.write(self._write_end, line.encode() + b"\n")
        except OSError:  # the warden is gone; nothing more it could do
            pass

    def registrar(self, kind: str = "app") -> Callable[[], None]:
        """An ``on_fork`` hook: the child writes ``<kind> <its pgid>`` to the warden
        (one write of a few bytes on a pipe is atomic)."""
        fd = self._write_end

        def register() -> None:
            os.write(fd, f"{kind} {os.getpgid(0)}\n".encode())

        return register

    def watch_postgres(self, data_dir: str | Path) -> None:
        """Stop the postmaster of ``data_dir`` too (said before it is started)."""
        self._send(f"postgres {data_dir}")

    def stop_everything(self, timeout: float) -> bool:
        """Ask the warden to stop every registered process, in order, and wait until it
        has (the same path it takes when ``outlast up`` dies). ``False`` on a timeout."""
        self._send("stop")
        try:
            os.close(self._write_end)
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
