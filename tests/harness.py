"""The process harness: the Procfile's lines as real subprocesses.

Each process runs in its own process group with its log kept under the test's tmp dir;
tests kill, stop and restart them on purpose. ``Stack.stop_all`` (run by the ``stack``
fixture) leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import requests

from app.dev.embedded import free_port
from app.dev.processes import ManagedProcess, stop_all


def read_procfile(root: Path) -> dict[str, str]:
    """``{process type: command}`` from the Procfile at ``root``."""
    entries: dict[str, str] = {}
    for line in (root / "Procfile").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class Stack:
    """Start, kill and stop the Procfile's processes for one test."""

    def __init__(self, root: Path, env: Mapping[str, str], log_dir: Path):
        self.root = root
        self.procfile = read_procfile(root)
        self.log_dir = log_dir
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
            **env,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: list[ManagedProcess] = []
        self._counts: dict[str, int] = {}
        self.web_port: int | None = None

    def start(self, name: str, extra_env: Mapping[str, str] | None = None) -> ManagedProcess:
        """Start the Procfile's ``name`` line (``web`` and ``flower`` get a free $PORT)."""
        env = {**self.env, **(extra_env or {})}
        if name in ("web", "flower") and "PORT" not in (extra_env or {}):
            env["PORT"] = str(free_port())
        if name == "web":
            self.web_port = int(env["PORT"])
        n = self._counts[name] = self._counts.get(name, 0) + 1
        proc = ManagedProcess(
            f"{name}.{n}",
            self.procfile[name],
            env=env,
            cwd=self.root,
            log_path=self.log_dir / f"{name}.{n}.log",
        )
        proc.port = int(env["PORT"]) if "PORT" in env else None  # type: ignore[attr-defined]
        self.processes.append(proc.start())
        return proc

    def run(self, name: str, timeout: float = 60.0) -> int:
        """Run a one-shot Procfile line (``release``) to completion; its exit code."""
        proc = self.start(name)
        try:
            return proc.process.wait(timeout)
        finally:
            proc.stop()

    @property
    def base_url(self) -> str:
        assert self.web_port is not None, "start('web') first"
        return f"http://127.0.0.1:{self.web_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the web process answers /readyz with 200."""

        def ready() -> bool:
            try:
                return requests.get(self.base_url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout, what="web /readyz 200")

    def wait_worker_ready(self, proc: ManagedProcess, timeout: float = 30.0) -> None:
        """Wait until a worker's log says it is ready to consume."""
        wait_until(lambda: "ready." in proc.log_text(), timeout, what=f"{proc.name} ready")

    def kill(self, proc: ManagedProcess) -> None:
        """SIGKILL the process's whole group: a crash, with no chance to clean up."""
        proc.kill()

    def stop(self, proc: ManagedProcess, sig: int = signal.SIGTERM) -> None:
        proc.stop(sig=sig)

    def stop_all(self) -> None:
        stop_all(self.processes, timeout=15)

    def logs(self) -> str:
        """Every process's log, for an assertion message."""
        return "\n".join(f"--- {p.name}\n{p.log_text()[-4000:]}" for p in self.processes)
