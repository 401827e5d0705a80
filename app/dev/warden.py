"""The warden: stops what ``outlast up`` started when ``outlast up`` itself dies.

``outlast up`` starts it first, in a session of its own (a closed terminal or a Ctrl-C
does not reach it), and keeps the write end of a pipe to it. Each process ``outlast up``
starts registers itself on that pipe before it runs its program (from between ``fork``
and ``exec``, so no process exists unregistered), one line each:

- ``app <pgid>``: a process group (web, worker, beat, flower and their children);
- ``service <pgid>``: a process group stopped after the apps (the embedded Redis);
- ``postgres <data dir>``: the embedded PostgreSQL of that data directory (pg_ctl runs it
  outside any group of ours; its PID is read from ``postmaster.pid`` when it is needed);
- ``stop``: ``outlast up`` is stopping (Ctrl-C, SIGTERM, a closed terminal, a failed
  process): stop everything now.

End of file without ``stop`` means ``outlast up`` died (even by ``kill -9``). Either way
the warden asks every group to stop (SIGTERM; PostgreSQL a fast shutdown), apps first,
waits up to the graceful timeout, SIGKILLs what is left, and exits: one way to stop,
used by every stop, so the crash path is the one that runs every day. It also holds ``outlast up``'s lock on the var
dir (an inherited descriptor), so a new ``outlast up`` waits until the old stack is gone.

Standard library only, and run as a script (``python -I warden.py GRACE``): it must not
depend on anything that could be half-imported or broken when it matters.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL = 0.05


def _alive(pid: int) -> bool:
    """``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``.

    Here, not in ``processes.py`` (which imports it), because the warden runs as a
    standard-library script and cannot import the package."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    """Some live (non-zombie) process is in process group ``pgid``."""
    return bool(group_members(pgid))


def postmaster_pid(data_dir: str) -> int | None:
    """The running postmaster of ``data_dir`` (``postmaster.pid``'s first line), if any."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    # A PID can be reused by another program: only a postgres of this data dir counts.
    if b"postgres" not in cmdline or os.fsencode(data_dir) not in cmdline or not _alive(pid):
        return None
    return pid


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait(still_running, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not still_running():
            return True
        time.sleep(POLL)
    return not still_running()


def stop_groups(groups: list[int], grace: float) -> None:
    """SIGTERM every group at once, SIGKILL those still running after ``grace``."""
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    if not _wait(lambda: any(group_alive(g) for g in groups), time.monotonic() + grace):
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        _wait(lambda: any(group_alive(g) for g in groups), time.monotonic() + 5)


def stop_postgres(data_dir: str, grace: float) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGQUIT, 3.0), (signal.SIGKILL, 3.0)):
        _signal_pid(pid, sig)
        if _wait(lambda: _alive(pid), time.monotonic() + wait):
            return


def stop_everything(apps: list[int], services: list[int], databases: list[str], grace: float):
    """The apps first (they finish or hand back their work), then the servers they use."""
    stop_groups(apps, grace)
    stop_groups(services, min(grace, 10.0))
    for data_dir in databases:
        stop_postgres(data_dir, min(grace, 10.0))


def main(argv: list[str]) -> int:
    grace = float(argv[1]) if len(argv) > 1 else 25.0
    # Only the pipe's end of file stops us: not a Ctrl-C or a hang-up meant for others.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    apps: list[int] = []
    services: list[int] = []
    databases: list[str] = []
    buffered = b""
    asked = False
    while not asked:
        try:
            chunk = os.read(0, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            kind, _, value = line.decode().partition(" ")
            if kind == "stop":
                asked = True
            elif kind == "app":
                apps.append(int(value))
            elif kind == "service":
                services.append(int(value))
            elif kind == "postgres":
                databases.append(value)
    stop_everything(apps, services, databases, grace)
    if not asked:
        try:
            os.write(2, b"outlast up ended without stopping its processes: the warden did\n")
        except OSError:
            pass  # the terminal may be gone with it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
