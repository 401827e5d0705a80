"""The stack's processes: ``outlast up`` and the Procfile's ``web``, ``worker``,
``beat`` and ``flower`` (each execs the real server with arguments from the settings)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from app import settings
from app.dev.processes import ManagedProcess, stop_all
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


@click.command("web")
def web() -> None:
    """The API under gunicorn on $PORT (gthread workers: long polls hold a thread, not a process)."""
    cfg = settings.current()
    _exec(
        [
            _bin("gunicorn"),
            "--bind",
            f"{cfg.bind_host}:{cfg.port}",
            "--worker-class",
            "gthread",
            "--workers",
            str(cfg.web_concurrency),
            "--threads",
            str(cfg.web_threads),
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
    )


@click.command("worker")
@click.option("--concurrency", type=int, default=None, help="Pool processes (default: cores).")
@click.option("--queues", default="steps,webhooks,maintenance", show_default=True)
def worker(concurrency: int | None, queues: str) -> None:
    """The Celery worker that runs steps, webhook deliveries and sweeps."""
    cfg = settings.current()
    _exec(
        [
            _bin("celery"),
            "--quiet",  # no banner: every line on stderr is a JSON log line
            "-A",
            CELERY_TARGET,
            "worker",
            "--queues",
            queues,
            "--concurrency",
            str(concurrency or cfg.worker_concurrency),
            "--events",
            "--loglevel",
            cfg.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


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


@click.command("up")
@click.option(
    "--var-dir",
    default="var",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the embedded servers keep their data.",
)
@click.option("--port", type=int, default=None, help="API port (default: $PORT or 8000).")
def up(var_dir: str, port: int | None) -> None:
    """Run release, web, worker and beat in the foreground (Ctrl-C stops all).

    With no DATABASE_URL / REDIS_URL, starts an embedded PostgreSQL and Redis under
    VAR_DIR first, and stops them on the way out.
    """
    from app.dev.embedded import EmbeddedPostgres, EmbeddedRedis

    var = Path(var_dir).resolve()
    var.mkdir(parents=True, exist_ok=True)
    cfg = settings.current()
    env = dict(os.environ)
    env.setdefault("OUTLAST_WEBHOOK_ALLOW_PRIVATE", "1")
    env.setdefault("OUTLAST_BIND_HOST", "127.0.0.1")
    env["PORT"] = str(port or cfg.port)
    embedded: list = []
    children: list[ManagedProcess] = []
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not cfg.database_url:
            click.echo(f"starting embedded PostgreSQL in {var / 'postgres'} ...", err=True)
            pg = EmbeddedPostgres(var / "postgres")
            embedded.append(pg)
            env["DATABASE_URL"] = pg.start()
        if not cfg.redis_url:
            click.echo("starting embedded Redis ...", err=True)
            redis = EmbeddedRedis(var / "redis")
            embedded.append(redis)
            env["REDIS_URL"] = redis.start()
        settings.configure(settings.Settings.from_env(env))
        click.echo("running migrations ...", err=True)
        db.upgrade()
        api_key = _dev_api_key(var)
        db.dispose()
        click.echo(f"OUTLAST_URL=http://127.0.0.1:{env['PORT']}")
        click.echo(f"OUTLAST_API_KEY={api_key}")
        sys.stdout.flush()
        me = [sys.executable, "-m", "app.cli"]
        for name in ("web", "worker", "beat"):
            children.append(ManagedProcess(name, [*me, name], env=env).start())
        while not stopping:
            for child in children:
                if not child.alive():
                    click.echo(
                        f"{child.name} exited with {child.process.returncode}; stopping the stack",
                        err=True,
                    )
                    stopping = True
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        click.echo("stopping ...", err=True)
        stop_all(children)
        for server in reversed(embedded):
            server.stop()
        click.echo("stopped", err=True)


COMMANDS = (up, web, worker, beat, flower)
