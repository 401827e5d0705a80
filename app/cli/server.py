"""The stack's processes: ``outlast up`` and the Procfile's ``web``, ``worker``,
``beat`` and ``flower`` (each execs the real server with arguments from the settings)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from app import settings
from app.dev.processes import ManagedProcess, Warden
from app.dev.stacklock import StackLock, StackRunning, port_problem
from app.ops import logs
from app.ops.redaction import RedactionFilter
from app.store import db, tenants

CELERY_TARGET = "workers.make_celery"


def _exec(argv: list[str]) -> None:
    """Replace this process with ``argv`` (signals then reach the server directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)


def _bin(name: str) -> str:
    """A console script installed beside this Python, else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


GUNICORN_CONFIG = "python:workers.gunicorn_conf"


def web_argv(cfg: settings.Settings) -> list[str]:
    """The gunicorn command of ``outlast web`` for ``cfg``."""
    if cfg.web_worker_class == "gevent":
        # A long poll or an SSE stream is a greenlet waiting on the LISTEN connection:
        # thousands cost memory, not request threads (docs/benchmarks.md, waiters).
        sizing = [
            "--worker-class",
            "gevent",
            "--worker-connections",
            str(cfg.web_worker_connections),
        ]
    else:
        sizing = ["--worker-class", "gthread", "--threads", str(cfg.web_threads)]
    return [
        _bin("gunicorn"),
        "--config",
        GUNICORN_CONFIG,
        "--bind",
        f"{cfg.bind_host}:{cfg.port}",
        *sizing,
        "--workers",
        str(cfg.web_concurrency),
        "--timeout",
        "60",
        "--graceful-timeout",
        "20",
        "--access-logfile",
        "-",
        "--logger-class",
        "app.ops.logs.GunicornLogger",
        "--no-control-socket",
        "workers.wsgi:create_web_app()",
    ]


@click.command("web")
def web() -> None:
    """The API under gunicorn on $PORT (gevent workers by default: OUTLAST_WEB_WORKER_CLASS)."""
    _exec(web_argv(settings.current()))


# The worker's second pool: sweeps and webhook sends on threads of their own, so that
# neither ever waits behind a running step (V2.md 8). Sends are I/O-bound and each lasts
# at most OUTLAST_WEBHOOK_TIMEOUT_SECONDS; sweeps are short database statements.
SIDE_QUEUES = "maintenance,webhooks"
SIDE_THREADS = 16
# A pool process that exits while the worker is not stopping is started again after this
# (kombu 5.7 can end a Celery worker on a Redis outage: docs/reliability.md).
RESTART_DELAY_SECONDS = 1.0


def _celery_worker_argv(
    name: str, queues: str, pool: str, concurrency: int, log_level: str
) -> list[str]:
    return [
        _bin("celery"),
        "--quiet",  # no banner: every line on stderr is a JSON log line
        "-A",
        CELERY_TARGET,
        "worker",
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        "--queues",
        queues,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--events",
        "--loglevel",
        log_level,
        "--without-gossip",
        "--without-mingle",
    ]


def _log_line(level: str, message: str, **fields: object) -> None:
    """One log line on stderr, formatted like every other line the worker writes
    (``OUTLAST_LOG_FORMAT``)."""
    import logging

    from app.ops import logs

    logger = logging.getLogger("outlast.worker")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        log_format = logs.resolve_format(settings.current().log_format)
        handler.setFormatter(logs.formatter(log_format, "worker"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.log(logging.getLevelName(level), message, extra=fields)


def _die_with_parent() -> None:
    """In a pool's child process before exec: SIGKILL it when the supervisor dies
    (Linux prctl PR_SET_PDEATHSIG), so a killed worker leaves no pool behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


READY_TIMEOUT_SECONDS = 120.0


def _wait_ready(read_end: int, child: object, timeout: float) -> None:
    """Wait until the pool writes to its ready pipe, exits, or ``timeout`` passes."""
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:  # type: ignore[attr-defined]
        readable, _, _ = select.select([read_end], [], [], 0.2)
        if readable:
            return


def supervise(pools: dict[str, list[str]]) -> int:
    """Run each pool as a child process in this process group; start again any that
    exits while we are not stopping; on SIGTERM/SIGINT/SIGQUIT pass the signal on and
    wait for all of them. Returns the exit code."""
    import subprocess

    children: dict[str, subprocess.Popen] = {}
    stopping: list[int] = []

    def on_signal(signum, _frame):
        stopping.append(signum)
        for child in children.values():
            if child.poll() is None:
                try:
                    child.send_signal(signum)
                except ProcessLookupError:
                    pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, on_signal)
    for n, (name, argv) in enumerate(pools.items()):
        if stopping:
            break
        if n < len(pools) - 1:
            # Each pool but the last starts the next once it is ready (a byte on a pipe).
            read_end, write_end = os.pipe()
            env = {**os.environ, "OUTLAST_READY_FD": str(write_end)}
            children[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                env=env,
                pass_fds=(write_end,),
            )
            os.close(write_end)
            _wait_ready(read_end, children[name], READY_TIMEOUT_SECONDS)
            os.close(read_end)
        else:
            children[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
    restart_at: dict[str, float] = {}
    while True:
        if stopping:
            codes = [child.wait() for child in children.values()]
            return max((abs(c) for c in codes), default=0)
        for name, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            if name not in restart_at:
                _log_line(
                    "ERROR",
                    f"the {name} pool exited with {code}; starting it again",
                    pool=name,
                    exit_code=code,
                )
                restart_at[name] = time.monotonic() + RESTART_DELAY_SECONDS
            elif time.monotonic() >= restart_at[name]:
                del restart_at[name]
                children[name] = subprocess.Popen(
                    pools[name], stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
                )
        time.sleep(0.2)


@click.command("worker")
@click.option("--concurrency", type=int, default=None, help="Step pool processes (default: cores).")
@click.option("--queues", default="steps", show_default=True, help="Queues of the step pool.")
@click.option(
    "--side-threads",
    type=int,
    default=SIDE_THREADS,
    show_default=True,
    help="Threads of the pool that runs sweeps and webhook sends (0: none).",
)
def worker(concurrency: int | None, queues: str, side_threads: int) -> None:
    """The Celery worker: a prefork pool that runs agent steps, and a thread pool of its
    own for the beat's sweeps and webhook deliveries (so neither waits behind steps).
    Both are child processes of this one, each started again if it exits unexpectedly."""
    cfg = settings.current()
    pools = {
        "steps": _celery_worker_argv(
            "steps", queues, "prefork", concurrency or cfg.worker_concurrency, cfg.log_level
        )
    }
    if side_threads > 0:
        pools["side"] = _celery_worker_argv(
            "side", SIDE_QUEUES, "threads", side_threads, cfg.log_level
        )
    sys.exit(supervise(pools))


@click.command("beat")
def beat() -> None:
    """The Celery beat scheduler (sweeps only; safe if two run by mistake)."""
    cfg = settings.current()
    schedule_dir = tempfile.mkdtemp(prefix="outlast-beat-")
    _exec(
        [
            _bin("celery"),
            "--quiet",
            "-A",
            CELERY_TARGET,
            "beat",
            "--schedule",
            os.path.join(schedule_dir, "schedule"),
            "--loglevel",
            cfg.log_level,
        ]
    )


@click.command("flower")
def flower() -> None:
    """The Flower dashboard on $PORT behind OUTLAST_FLOWER_BASIC_AUTH."""
    cfg = settings.current()
    if not cfg.flower_basic_auth:
        raise click.UsageError(
            "OUTLAST_FLOWER_BASIC_AUTH is not set: give it as user:password "
            "(several separated by commas); Flower is not served without auth."
        )
    _exec(
        [
            _bin("celery"),
            "-A",
            CELERY_TARGET,
            "flower",
            f"--port={cfg.port}",
            f"--address={cfg.bind_host}",
            f"--basic-auth={cfg.flower_basic_auth}",
        ]
    )


def _dev_api_key(var_dir: Path) -> str:
    """The ``dev`` tenant's key: created on first start, remembered in var/."""
    key_file = var_dir / "dev-tenant.json"
    with db.transaction() as conn:
        if key_file.exists():
            saved = json.loads(key_file.read_text())
            if tenants.tenant_for_api_key(conn, saved["api_key"]) is not None:
                return saved["api_key"]
        tenant_id = tenants.find_by_name(conn, "dev")
        if tenant_id is None:
            created = tenants.create(conn, "dev")
            saved = created.as_json()
        else:  # the tenant exists but this checkout lost its key: issue another
            saved = {
                "tenant_id": tenant_id,
                "name": "dev",
                "api_key": tenants.issue_api_key(conn, tenant_id),
            }
    key_file.write_text(json.dumps(saved))
    key_file.chmod(0o600)
    return saved["api_key"]


def _dev_flower_auth(var_dir: Path, configured: str | None) -> str:
    """Flower's ``user:password`` under ``outlast up``: OUTLAST_FLOWER_BASIC_AUTH, else
    one made on first use and remembered in var/."""
    if configured:
        return configured
    auth_file = var_dir / "flower-basic-auth"
    if auth_file.exists():
        return auth_file.read_text().strip()
    auth = f"dev:{secrets.token_urlsafe(12)}"
    auth_file.write_text(auth)
    auth_file.chmod(0o600)
    return auth


# How long the stack gets to stop (gunicorn's graceful timeout and the worker's soft
# shutdown are 20 s) before what is left is killed.
GRACE_SECONDS = 25.0
READY_TIMEOUT = 120.0
# Celery warns on every start when the worker runs as root. Only under `outlast up`, a
# developer's local stack (a dev container or sandbox often runs as root), and the
# worker accepts JSON only (Celery itself refuses pickle as root): the Procfile's worker
# keeps the warning, where it matters. C_FORCE_ROOT would not silence it (it only allows
# pickle as root, which is worse).
_ROOT_WARNING_FILTER = "ignore:You're running the worker with superuser privileges"


class _Stop(BaseException):
    """``outlast up`` was asked to stop. A ``BaseException``, as ``KeyboardInterrupt``
    is: a start-up probe's ``except Exception`` must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """The handler of SIGINT, SIGTERM and SIGHUP: it records the signal, and
    :meth:`check` (between start-up steps and every 0.2 s while waiting) raises
    :class:`_Stop`.

    The handler does not raise itself: Python runs a handler wherever the main thread
    is, and where that is a weakref callback or a ``__del__`` (the garbage collector
    runs them at any allocation), an exception is printed as "Exception ignored in" and
    dropped. A Ctrl-C was lost that way, right after the API answered, and the stack
    kept running. A second signal raises at once (a start-up step that will not end),
    except inside :meth:`held` (pg_ctl's start: stopping half-way leaves a server)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._holding = False

    def __call__(self, signum: int, _frame: Any) -> None:
        again = self.signum is not None
        self.signum = self.signum or signum
        if again and not self._holding:
            raise _Stop(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise _Stop(self.signum)

    @contextlib.contextmanager
    def held(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False


class _Output:
    """``outlast up``'s own lines. A write never fails: when the reader is gone (``| tee``
    ended first on Ctrl-C, the terminal was closed), the stream becomes /dev/null and the
    shutdown goes on."""

    def __init__(self, log_format: str):
        self.formatter = logs.formatter(log_format, "up")
        self._redaction = RedactionFilter()

    def say(self, text: str = "") -> None:
        """A line for people on stdout (the banner)."""
        self._write(sys.stdout, text + "\n")

    def log(self, message: str, level: int = logging.INFO) -> None:
        """A log line on stderr, in the stack's format."""
        record = logging.LogRecord("outlast.up", level, __file__, 0, message, None, None)
        self._redaction.filter(record)  # as every handler does (V2.md 12a)
        self._write(sys.stderr, self.formatter.format(record) + "\n")

    def refuse(self, message: str) -> None:
        """A plain sentence on stderr: why nothing was started."""
        self._write(sys.stderr, message + "\n")

    @staticmethod
    def _write(stream, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            _silence(stream)


def _silence(stream) -> None:
    """Point ``stream``'s descriptor at /dev/null (what is buffered flushes there too)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _outlast_command() -> str:
    """How to type ``outlast`` here: plain when it is on PATH, else its path."""
    path = _bin("outlast")
    if shutil.which("outlast") == path:
        return "outlast"
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    except ValueError:
        return path


def _banner(
    out: _Output,
    url: str,
    api_key: str,
    var: Path,
    flower_url: str | None,
    flower_auth: str | None,
) -> None:
    """What a newcomer needs once the stack is ready, to copy and paste."""
    outlast = _outlast_command()
    body = json.dumps({"agent": "echo", "input": {"message": "hello"}})
    out.say()
    out.say(f"Outlast is ready (data in {_shown(var)}). Ctrl-C stops everything.")
    out.say()
    out.say(f"  API       {url}")
    out.say(f"  API docs  {url}/docs")
    if flower_url and flower_auth:
        user, _, password = flower_auth.split(",")[0].partition(":")
        out.say(f"  Flower    {flower_url}  (user {user}, password {password})")
    else:
        out.say("  Flower    not started: `outlast up --flower` adds it")
    out.say()
    out.say("A first task, from another terminal:")
    out.say()
    out.say(f"  export OUTLAST_URL={url} OUTLAST_API_KEY={api_key}")
    out.say(f'  {outlast} submit echo --input \'{{"message": "hello"}}\' --wait')
    out.say()
    out.say(
        f"  curl -s -X POST {url}/v1/tasks -H 'Authorization: Bearer {api_key}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )
    out.say()


def _shown(path: Path) -> str:
    """``./var`` inside the current directory, else the whole path."""
    try:
        return "./" + str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _ready(url: str) -> bool:
    import requests

    try:
        # Generous: requests that time out while the app loads are still answered, and logged.
        return requests.get(url + "/readyz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _worker_answers(redis_url: str) -> bool:
    """Some Celery worker on this broker answers a ping."""
    from celery import Celery

    probe = Celery("outlast-up", broker=redis_url)
    try:
        return bool(probe.control.ping(timeout=1.0))
    except Exception:  # the broker is not there yet: not ready
        return False
    finally:
        probe.close()


def _listens(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _first_exited(children: list[ManagedProcess]) -> ManagedProcess | None:
    return next((c for c in children if not c.alive()), None)


def _wait_for(stop: _StopSignals, children: list[ManagedProcess], ready, what: str) -> str | None:
    """Poll ``ready`` until it holds (``None``), a child exits or READY_TIMEOUT passes
    (``what`` it was waiting for); raises :class:`_Stop` once a signal asked for it."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        stop.check()
        if _first_exited(children) or time.monotonic() > deadline:
            return what
        time.sleep(0.2)
    return None


@click.command("up")
@click.option(
    "--var-dir",
    default="var",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the embedded servers keep their data (one stack per folder).",
)
@click.option("--port", type=int, default=None, help="API port (default: $PORT or 8000).")
@click.option("--flower", "with_flower", is_flag=True, help="Also run Flower, behind basic auth.")
@click.option("--flower-port", type=int, default=None, help="Flower's port (default: port + 1).")
def up(var_dir: str, port: int | None, with_flower: bool, flower_port: int | None) -> None:
    """Run release, web, worker and beat in the foreground (Ctrl-C stops all).

    With no DATABASE_URL / REDIS_URL, starts an embedded PostgreSQL and Redis under
    VAR_DIR first. However it ends (Ctrl-C, SIGTERM, a closed terminal, even kill -9),
    every process it started is stopped. Exits 1 when it stopped because a process
    failed, or when another `outlast up` runs in VAR_DIR.
    """
    cfg = settings.current()
    env = dict(os.environ)
    env.setdefault("OUTLAST_WEBHOOK_ALLOW_PRIVATE", "1")
    env.setdefault("OUTLAST_BIND_HOST", "127.0.0.1")
    env["PORT"] = str(port or cfg.port)
    log_format = logs.resolve_format(cfg.log_format)
    env["OUTLAST_LOG_FORMAT"] = log_format  # every process decides as this one did
    env["PYTHONWARNINGS"] = ",".join(
        filter(None, [env.get("PYTHONWARNINGS"), _ROOT_WARNING_FILTER])
    )
    child_cfg = settings.Settings.from_env(env)
    url = f"http://127.0.0.1:{child_cfg.port}"
    out = _Output(log_format)

    var = Path(var_dir).resolve()
    var.mkdir(parents=True, exist_ok=True)
    lock = StackLock(var)
    try:
        lock.acquire()
    except StackRunning as running:
        out.refuse(running.message())
        sys.exit(1)
    flower_port = flower_port or child_cfg.port + 1
    problem = port_problem(child_cfg.bind_host, child_cfg.port)
    if problem is None and with_flower:
        problem = port_problem(child_cfg.bind_host, flower_port, "Flower's port")
    if problem:
        out.refuse(problem)
        sys.exit(1)
    lock.record(os.getpid(), url)
    if lock.previous:
        out.log(f"took over the lock of an outlast up that is gone (pid {lock.previous['pid']})")
    sys.exit(_run_stack(out, env, var, url, lock, with_flower, flower_port))


def _run_stack(
    out: _Output,
    env: dict[str, str],
    var: Path,
    url: str,
    lock: StackLock,
    with_flower: bool,
    flower_port: int,
) -> int:
    """Start everything, watch it, stop it; the exit status."""
    from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis

    cfg = settings.current()
    warden = Warden(GRACE_SECONDS, keep_fds=[lock.fileno()])
    children: list[ManagedProcess] = []
    embedded: list = []
    stop = _StopSignals()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    status = 0
    try:
        if not cfg.database_url:
            out.log(f"starting embedded PostgreSQL in {_shown(var / 'postgres')}")
            pg = EmbeddedPostgres(var / "postgres")
            warden.watch_postgres(pg.data_dir)
            embedded.append(pg)
            with stop.held():
                env["DATABASE_URL"] = pg.start()
            stop.check()
        if not cfg.redis_url:
            out.log("starting embedded Redis")
            redis = EmbeddedRedis(var / "redis", on_fork=warden.registrar("service"))
            embedded.append(redis)
            env["REDIS_URL"] = redis.start()
            stop.check()
        settings.configure(settings.Settings.from_env(env))
        out.log("running migrations")
        db.upgrade()
        api_key = _dev_api_key(var)
        db.dispose()
        stop.check()
        # API.md's two lines, as soon as they are known (scripts read them); the rest of
        # what to do comes once everything is ready.
        out.say(f"OUTLAST_URL={url}")
        out.say(f"OUTLAST_API_KEY={api_key}")
        me = [sys.executable, "-m", "app.cli"]

        def start(name: str, child_env: dict[str, str]) -> None:
            child = ManagedProcess(name, [*me, name], env=child_env, on_fork=warden.registrar())
            children.append(child.start())

        for name in ("web", "worker", "beat"):
            start(name, env)
        # Ready means a first task runs at once: the API answers and a worker listens.
        waiting = _wait_for(stop, children, lambda: _ready(url), "the API to answer /readyz")
        waiting = waiting or _wait_for(
            stop, children, lambda: _worker_answers(env["REDIS_URL"]), "a worker to answer a ping"
        )
        flower_url = flower_auth = None
        if not waiting and with_flower:
            # After the worker: Flower's first look at the workers then finds one.
            flower_auth = _dev_flower_auth(var, cfg.flower_basic_auth)
            flower_url = f"http://127.0.0.1:{flower_port}"
            start(
                "flower",
                {**env, "PORT": str(flower_port), "OUTLAST_FLOWER_BASIC_AUTH": flower_auth},
            )
            waiting = _wait_for(stop, children, lambda: _listens(flower_port), "Flower to listen")
        failed = _first_exited(children)
        if waiting and failed is None:
            out.log(f"gave up after {READY_TIMEOUT:.0f} s waiting for {waiting}", logging.ERROR)
            status = 1
        elif failed is None:
            _banner(out, url, api_key, var, flower_url, flower_auth)
            while failed is None:
                stop.check()
                time.sleep(0.2)
                failed = _first_exited(children)
        if failed is not None:
            out.log(
                f"{failed.name} exited with status {failed.process.returncode}; stopping the stack",
                logging.ERROR,
            )
            status = 1
    except _Stop as stopped:
        out.log(f"{stopped} received; stopping")
    except Exception as exc:
        if stop.signum is not None:  # a step that the signal reached too (Ctrl-C: initdb)
            name = signal.Signals(stop.signum).name
            out.log(f"{name} received; stopping (the step it interrupted ended with {exc!r})")
        else:  # a start-up step failed: say which, then stop what started
            out.log(f"outlast up could not start: {exc!r}", logging.ERROR)
            status = 1
    finally:
        _stop_stack(out, warden, children, embedded)
        lock.release()
    return status


def _stop_stack(
    out: _Output, warden: Warden, children: list[ManagedProcess], embedded: list
) -> None:
    """The warden stops everything (the same path as when this process dies); a second
    Ctrl-C kills the apps at once."""

    def hurry(signum, _frame):
        if signum == signal.SIGINT:  # Ctrl-C again: do not wait for them
            for child in children:
                child.signal_group(signal.SIGKILL)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, hurry)
    started = time.monotonic()
    if not warden.stop_everything(timeout=GRACE_SECONDS + 30):
        out.log("the warden did not finish stopping the stack", logging.ERROR)
    for child in children:  # reap them (they are our children)
        try:
            child.process.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
    for server in reversed(embedded):  # already stopped: this reaps Redis, checks PostgreSQL
        server.stop()
    out.log(f"stopped in {time.monotonic() - started:.1f} s")


COMMANDS = (up, web, worker, beat, flower)
