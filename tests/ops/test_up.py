"""``outlast up`` as a newcomer meets it: real processes, embedded PostgreSQL and Redis.

Two stacks serve the module, started together: one with its output in files (JSON
lines, at DEBUG so that the idle test can see the sweeps it must not hear at INFO) and
one in a pseudo-terminal (console lines), as `make run` in a terminal. Each ends the way
a person ends it: ``kill -9`` for the first, closing the terminal for the second.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from app.cli.server import GRACE_SECONDS
from app.dev.embedded import free_port
from tests.conftest import TEST_ENV
from tests.harness import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults]

OUTLAST = str(Path(sys.executable).with_name("outlast"))
# Under TEST_ENV every sweep but the hourly purge runs each second or faster: ten times
# as often as with the defaults (10 s reaper, 5 s webhook sweep). So 3 s of this stack
# hold the sweeps of 30 s of a default one; 5 s leave a margin.
IDLE_SECONDS = 5.0
SWEEPS = (
    "outlast.sweep.reap",
    "outlast.sweep.relay_outbox",
    "outlast.sweep.wake_timers",
    "outlast.sweep.expire_deadlines",
    "outlast.sweep.redispatch_lost",
    "outlast.sweep.webhooks",
    "outlast.sweep.expire_keys",
)


def _up_env(port: int, **extra: str) -> dict[str, str]:
    """A newcomer's environment: no DATABASE_URL / REDIS_URL (embedded servers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({k: v for k, v in TEST_ENV.items() if k != "OUTLAST_LOG_FORMAT"})
    env.update(
        {
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "OUTLAST_WORKER_CONCURRENCY": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
    )
    env.update(extra)
    return env


# --- the processes of a stack ------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, ...; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _live_pids() -> dict[int, list[str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] != "Z":
                found[int(entry)] = stat
    return found


def stack_processes(up_pid: int, var: Path) -> dict[int, str]:
    """Every process of the stack: ``outlast up``'s descendants, the members of their
    process groups, and what runs on the var dir (pg_ctl's postmaster is nobody's child).
    ``{pid: start time}`` (field 22), so that a reused PID does not count as a survivor."""
    live = _live_pids()
    children: dict[int, list[int]] = {}
    for pid, stat in live.items():
        children.setdefault(int(stat[1]), []).append(pid)
    found, todo = {up_pid}, [up_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    groups = {int(live[p][2]) for p in found if p in live}
    found |= {p for p, stat in live.items() if int(stat[2]) in groups}
    found |= {p for p in live if str(var) in _cmdline(p)}
    found.discard(os.getpid())
    return {p: live[p][19] for p in found if p in live}


def survivors(snapshot: dict[int, str]) -> dict[int, str]:
    live = _live_pids()
    return {
        pid: _cmdline(pid)[:100]
        for pid, start in snapshot.items()
        if pid in live and live[pid][19] == start
    }


def _kinds(snapshot: dict[int, str]) -> set[str]:
    kinds = set()
    for pid in snapshot:
        cmd = _cmdline(pid)
        for kind in ("postgres", "redis-server", "gunicorn", "celery", "warden.py", "outlast up"):
            if kind in cmd:
                kinds.add(kind)
    return kinds


# --- a running outlast up ----------------------------------------------------------------


@dataclass
class Up:
    """One ``outlast up``: its process, folder, port, and what it wrote."""

    process: subprocess.Popen
    var: Path
    port: int
    out_path: Path | None = None  # stdout (files) ...
    err_path: Path | None = None  # ... and stderr, or
    terminal: int | None = None  # the master side of its pseudo-terminal
    screen: bytearray = field(default_factory=bytearray)
    _reading: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        if self.terminal is not None:
            return self.screen.decode(errors="replace").replace("\r\n", "\n")
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stdout() if self.terminal is not None else self.err_path.read_text()

    def printed(self, prefix: str) -> str:
        return next(x for x in self.stdout().splitlines() if x.startswith(prefix))

    @property
    def api_key(self) -> str:
        return self.printed("OUTLAST_API_KEY=").partition("=")[2]

    def read_terminal(self) -> None:
        def drain() -> None:
            while self._reading.is_set():
                ready, _, _ = select.select([self.terminal], [], [], 0.1)
                if ready:
                    try:
                        chunk = os.read(self.terminal, 65536)
                    except OSError:  # EIO: the other side is gone
                        return
                    if not chunk:
                        return
                    self.screen.extend(chunk)

        self._reading.set()
        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def close_terminal(self) -> None:
        """Close the terminal window: the master side goes, the kernel hangs up."""
        self._reading.clear()
        self._reader.join()
        os.close(self.terminal)
        self.terminal = None

    def snapshot(self) -> dict[int, str]:
        return stack_processes(self.process.pid, self.var)

    def end(self) -> None:
        """Whatever a test left running: stop it (the warden does the rest)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(GRACE_SECONDS + 20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.terminal is not None:
            self.close_terminal()


def start_in_files(tmp: Path, **extra: str) -> Up:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    out, err = tmp / "stdout", tmp / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        process = subprocess.Popen(
            [OUTLAST, "up", "--var-dir", str(tmp / "var")],
            env=_up_env(port, **extra),
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=o,
            stderr=e,
            start_new_session=True,
        )
    return Up(process, tmp / "var", port, out_path=out, err_path=err)


def start_in_terminal(tmp: Path, **extra: str) -> Up:
    """``outlast up`` as the controlling process of a new pseudo-terminal's session."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    master, slave = os.openpty()
    process = subprocess.Popen(
        [OUTLAST, "up", "--var-dir", str(tmp / "var")],
        env=_up_env(port, **extra),
        cwd=tmp,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,  # setsid(), then the terminal becomes the session's
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    up = Up(process, tmp / "var", port, terminal=master)
    up.read_terminal()
    return up


def wait_running(up: Up, timeout: float = 120.0) -> None:
    def banner() -> bool:
        assert up.process.poll() is None, f"outlast up exited:\n{up.stderr()[-3000:]}"
        return "A first task, from another terminal:" in up.stdout()

    wait_until(banner, timeout, interval=0.2, what="outlast up's ready banner")


def readyz(url: str) -> int:
    return requests.get(url + "/readyz", timeout=10).status_code


@pytest.fixture(scope="module")
def folders() -> Iterator[Path]:
    """Where the stacks live. Not under pytest's tmp dir: as root, pgserver runs PostgreSQL
    as a user of its own, which must traverse every parent directory, and any pytest
    session starting meanwhile (another checkout's) resets /tmp/pytest-of-root to 0700."""
    root = Path(tempfile.mkdtemp(prefix="outlast-up-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stacks(folders) -> Iterator[tuple[Up, Up]]:
    """(files, terminal): two stacks started at once; each test that ends one ends it."""
    files = start_in_files(folders / "files", OUTLAST_LOG_LEVEL="DEBUG")
    terminal = start_in_terminal(folders / "terminal")
    try:
        wait_running(files)
        wait_running(terminal)
        yield files, terminal
    finally:
        files.end()
        terminal.end()


@pytest.fixture(scope="module")
def files_stack(stacks) -> Up:
    return stacks[0]


@pytest.fixture(scope="module")
def terminal_stack(stacks) -> Up:
    return stacks[1]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- before anything starts ----------------------------------------------------------------


def test_a_busy_port_is_said_plainly_before_anything_starts_and_a_stale_lock_is_taken_over(
    tmp_path,
):
    # Given a folder whose lock names an outlast up that died, and a port taken by another
    var = tmp_path / "var"
    var.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (var / "outlast-up.lock").write_text(json.dumps({"pid": dead.pid, "url": "x"}))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        # When outlast up starts there
        started = time.monotonic()
        out = subprocess.run(
            [OUTLAST, "up", "--var-dir", str(var)],
            env=_up_env(port),
            capture_output=True,
            text=True,
            timeout=30,
        )

    # Then it got past the stale lock, names the port, and started nothing
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - started < 10
    assert f"port {port} (PORT) is already in use by pid {os.getpid()}" in out.stderr
    assert "--port" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in var.iterdir()) == ["outlast-up.lock"]


def test_a_process_that_fails_stops_the_stack_with_a_non_zero_status(
    tmp_path, database_url, servers
):
    # Given servers of our own (no embedded ones: quicker) and a web process that cannot
    # start (gunicorn refuses an unknown option from its environment)
    port = free_port()
    env = _up_env(
        port,
        DATABASE_URL=database_url,
        REDIS_URL=servers.redis_url,
        GUNICORN_CMD_ARGS="--no-such-option",
    )
    up = subprocess.Popen(
        [OUTLAST, "up", "--var-dir", str(tmp_path / "var")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = up.communicate(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
    # Then outlast up says which one failed, stops the others and exits 1
    assert up.returncode == 1, err
    failed = [x for x in _json_lines(err) if "stopping the stack" in x["message"]]
    assert failed and failed[0]["message"].startswith("web exited with status")
    assert any(x["message"].startswith("stopped in") for x in _json_lines(err))
    assert not survivors(stack_processes(up.pid, tmp_path / "var"))


def test_up_with_flower_prints_its_login_and_ctrl_c_through_tee_stops_everything(
    tmp_path, database_url, servers
):
    # Given `outlast up --flower |& tee log` in a terminal (its own process group), on
    # servers of our own (quicker than embedded ones)
    port = free_port()
    env = _up_env(port, DATABASE_URL=database_url, REDIS_URL=servers.redis_url)
    up_command = f"{OUTLAST} up --flower --var-dir {tmp_path / 'var'}"
    script = (
        f"({up_command} 2>&1; echo $? > {tmp_path / 'status'}) | tee {tmp_path / 'log'} >/dev/null"
    )
    (tmp_path / "log").touch()
    shell = subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True)
    try:
        wait_until(
            lambda: "A first task" in (tmp_path / "log").read_text(),
            90,
            interval=0.2,
            what="the banner through tee",
        )
        (up_pid,) = [
            p for p in _live_pids() if up_command in _cmdline(p) and "bash" not in _cmdline(p)
        ]
        processes = stack_processes(up_pid, tmp_path / "var")
        assert {"gunicorn", "celery", "warden.py"} <= _kinds(processes)
        # Flower is there, behind the login the banner printed
        login = re.search(
            rf"Flower    http://127\.0\.0\.1:{port + 1}  \(user (\S+), password (\S+)\)",
            (tmp_path / "log").read_text(),
        )
        assert login, (tmp_path / "log").read_text()[-2000:]
        flower = f"http://127.0.0.1:{port + 1}/api/workers"
        assert requests.get(flower, timeout=10).status_code == 401
        assert requests.get(flower, auth=login.groups(), timeout=10).status_code == 200
        assert any("flower" in _cmdline(p) for p in processes)

        # When Ctrl-C reaches the whole pipeline (tee dies at once: up's output is gone)
        os.killpg(shell.pid, signal.SIGINT)

        # Then outlast up still stops everything, and exits 0 (it was asked to stop)
        wait_until(lambda: not survivors(processes), GRACE_SECONDS, what="no survivors")
        wait_until(lambda: (tmp_path / "status").exists(), 10, what="outlast up's status")
        assert (tmp_path / "status").read_text().strip() == "0"
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(30)


# --- a running stack -------------------------------------------------------------------------


def test_up_prints_the_url_the_key_the_docs_and_a_first_task_to_copy(files_stack):
    up = files_stack
    out = up.stdout()
    assert re.search(rf"(?m)^OUTLAST_URL={re.escape(up.url)}$", out)
    assert re.search(r"(?m)^OUTLAST_API_KEY=olk_\S{20,}$", out)
    assert out.index("OUTLAST_API_KEY=") < out.index("Outlast is ready (data in ./var)")
    assert f"API docs  {up.url}/docs" in out
    assert "`outlast up --flower` adds it" in out
    # The curl line, pasted into a shell, submits a task.
    curl = up.printed("  curl ")
    answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
    task = json.loads(answer.stdout)
    assert task["object"] == "task" and task["status"] == "pending", answer.stdout
    assert requests.get(up.url + "/docs", timeout=10).status_code == 200


def test_an_idle_stack_writes_no_info_line(files_stack):
    # Given a stack that started and has nothing to do (it runs at DEBUG: the sweeps'
    # lines are visible, at their level)
    up = files_stack
    wait_until(lambda: _sweeps_logged(up.stderr()) >= set(SWEEPS), 30, what="every sweep ran")
    time.sleep(1.5)  # the curl task of the previous test finishes
    before_out, before_err = len(up.stdout()), len(up.stderr())

    # When it idles
    time.sleep(IDLE_SECONDS)

    # Then every sweep ran, and nothing at INFO or above was written
    new_err = up.stderr()[before_err:]
    new_out = up.stdout()[before_out:]
    lines = _json_lines(new_err) + _json_lines(new_out)
    assert len(lines) == len(new_err.splitlines()) + len(new_out.splitlines())  # all JSON
    loud = [x for x in lines if x["level"] not in ("DEBUG",)]
    assert loud == [], loud[:5]
    assert _sweeps_logged(new_err) >= set(SWEEPS)
    sent = [x for x in lines if "Sending due task" in x["message"]]
    assert sent and {x["process"] for x in sent} == {"beat"}
    assert any(x["message"] == "sweep reap: nothing to do" for x in lines)


def _sweeps_logged(text: str) -> set[str]:
    return set(re.findall(r"Task (outlast\.sweep\.\w+)\[[^]]+\] succeeded", text))


def test_start_up_writes_no_warning_fragment(files_stack, terminal_stack):
    for up in (files_stack, terminal_stack):
        text = up.stdout() + up.stderr()
        assert "RuntimeDirWarning" not in text and "XDG_RUNTIME_DIR" not in text
        assert "SecurityWarning" not in text and "superuser privileges" not in text
    # The files stack's stderr is JSON lines only, each naming its process.
    lines = files_stack.stderr().splitlines()
    assert all(line.startswith("{") for line in lines), [x for x in lines if x[:1] != "{"][:3]
    processes = {json.loads(x)["process"] for x in lines}
    assert {"up", "web", "worker", "beat"} <= processes


def test_a_second_up_in_the_same_folder_exits_1_at_once_naming_the_first(files_stack):
    # Given a running stack
    up = files_stack
    before = up.snapshot()

    # When a second outlast up starts in the same folder (on another port)
    started = time.monotonic()
    second = subprocess.run(
        [OUTLAST, "up", "--var-dir", str(up.var)],
        env=_up_env(free_port()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    took = time.monotonic() - started

    # Then it exits 1 within 5 s naming the first, which goes on untouched
    print(f"the second outlast up exited {second.returncode} after {took:.1f} s")
    assert second.returncode == 1, second.stderr
    assert took < 5, took
    assert f"already running in {up.var} (pid {up.process.pid}, {up.url})" in second.stderr
    assert readyz(up.url) == 200
    assert not set(before) - set(up.snapshot())  # every process of the first still runs


def test_a_tasks_lines_carry_its_id_in_json(files_stack):
    up = files_stack
    task_id = _submit_as_printed(up)

    def lines() -> list[dict]:
        mine = [x for x in _json_lines(up.stderr()) if x.get("task_id") == task_id]
        return mine if sum("succeeded" in x["message"] for x in mine) == 2 else []

    mine = wait_until(lines, 30, what=f"{task_id}'s lines")
    assert {x["process"] for x in mine} == {"worker"}
    assert sum("received" in x["message"] for x in mine) == 2  # both steps, both lines
    assert {x["step"] for x in mine} == {0, 1}


def test_a_tasks_lines_carry_its_id_in_the_console(terminal_stack):
    up = terminal_stack
    task_id = _submit_as_printed(up)
    # 15:47:55 worker INFO  tsk_… step 0: outlast.run_step[echo@1] succeeded in 0.335s: 'continued'
    line = re.compile(
        rf"^\d\d:\d\d:\d\d worker INFO  {task_id} step (\d): outlast\.run_step\[echo@1\] (\w+)"
    )

    def lines() -> list[str]:
        mine = [x for x in up.stdout().splitlines() if line.match(x)]
        return mine if len(mine) == 4 else []

    mine = wait_until(lines, 30, what=f"{task_id}'s console lines")
    assert sorted(line.match(x).groups() for x in mine) == [
        ("0", "received"),
        ("0", "succeeded"),
        ("1", "received"),
        ("1", "succeeded"),
    ]
    assert all(len(x) < 125 for x in mine), mine  # short: no message id, a rounded time


def _submit_as_printed(up: Up) -> str:
    """The banner's ``export`` and ``outlast submit`` lines, run in a shell as printed
    (with a two-step input); the task's id."""
    export = up.printed("  export ").strip()
    submit = next(x.strip() for x in up.stdout().splitlines() if " submit echo " in x)
    submit = submit.replace('{"message": "hello"}', '{"message": "hi", "steps": 2}')
    done = subprocess.run(
        ["bash", "-c", f"{export}\n{submit}"],
        env=_up_env(up.port),  # the PATH outlast up had: it printed `outlast` if found there
        capture_output=True,
        text=True,
        timeout=60,
        cwd=up.var.parent,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"message": "hi", "steps": 2}
    return re.search(r"submitted (tsk_\S+)", done.stderr).group(1)


# --- how a stack ends ------------------------------------------------------------------------


def test_closing_its_terminal_leaves_no_process_behind(terminal_stack):
    # Given a stack in a terminal, idle at INFO: the console shows nothing new
    up = terminal_stack
    processes = up.snapshot()
    assert {"postgres", "redis-server", "gunicorn", "celery", "warden.py"} <= _kinds(processes)

    # When the terminal is closed (the kernel hangs up its session: SIGHUP)
    up.close_terminal()

    # Then every process it started is gone, and outlast up exited
    wait_until(lambda: not survivors(processes), GRACE_SECONDS + 5, what="no survivors")
    assert up.process.wait(10) == 0
    assert not (up.var / "postgres" / "postmaster.pid").exists()
    assert (up.var / "outlast-up.lock").read_text() == ""  # a clean stop leaves no holder


def test_kill_9_of_up_leaves_no_process_behind_within_the_graceful_timeout(files_stack):
    # Given a running stack
    up = files_stack
    processes = up.snapshot()
    assert {"postgres", "redis-server", "gunicorn", "celery", "warden.py"} <= _kinds(processes)

    # When outlast up is killed without a chance to clean up
    started = time.monotonic()
    up.process.kill()
    up.process.wait()

    # Then every process it started is gone within the graceful timeout
    wait_until(lambda: not survivors(processes), GRACE_SECONDS, what="no survivors")
    print(f"kill -9: the stack was gone {time.monotonic() - started:.1f} s later")
    assert not (up.var / "postgres" / "postmaster.pid").exists()
    with open(up.var / "outlast-up.lock") as lock:  # and the folder is free again
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_stop_signal_that_lands_in_a_weakref_callback_still_stops_up():
    """The Ctrl-C that was lost: a signal handler that raises, run while the main thread
    is inside a weakref callback (the garbage collector runs them at any allocation),
    raises there, and Python prints "Exception ignored in" and drops it. ``outlast up``'s
    handler records the signal instead; its loops' ``check`` raises. Here the main
    thread spends nearly all its time in weakref callbacks when the signal comes, so a
    raising handler loses it (nearly always: 8 times in 8) and this test fails."""
    import weakref

    from app.cli.server import _Stop, _StopSignals

    class Thing:
        pass

    def slow_callback(_ref):
        busy_until = time.perf_counter() + 0.02
        while time.perf_counter() < busy_until:
            pass

    stop = _StopSignals()
    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        deadline = time.monotonic() + 5
        with pytest.raises(_Stop) as stopped:
            while time.monotonic() < deadline:
                refs = [weakref.ref(Thing(), slow_callback) for _ in range(5)]  # noqa: F841
                stop.check()
        assert stopped.value.signum == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, previous)
