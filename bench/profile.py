"""``python -m bench.run profile``: where a step's and a submission's time goes.

Runs Outlast's real processes, keeps them busy (echo tasks of many steps; or
``POST /v1/tasks`` under load), and samples them with py-spy (``--idle``, so time spent
waiting on PostgreSQL or Redis shows up as well as CPU). The samples are folded into a
few buckets (waiting on PostgreSQL, publishing to Redis, JSON, logging, SQLAlchemy's own
Python, our code ...) and the heaviest functions of our code, inclusive.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.infra import ROOT, Infra
from bench.loadgen import run_load

# (bucket, substrings of a frame): the first frame from the leaf upwards that matches
# one decides the bucket. py-spy shows Python frames only, so a sample whose leaf is
# SQLAlchemy's do_execute is one waiting in psycopg2 for PostgreSQL's answer.
BUCKETS = (
    (
        "PostgreSQL round trips (waiting in psycopg2)",
        (
            "do_execute (",
            "do_commit (",
            "do_rollback (",
            "do_ping (",
            "connect (psycopg2",
        ),
    ),
    ("Redis: publish / result (kombu, redis-py)", ("kombu/", "redis/")),
    ("JSON encode/decode", ("json/",)),
    ("logging", ("logging/", "pythonjsonlogger", "(app/logs.py")),
    ("lease keeper thread start/stop", ("threading.py",)),
    ("SQLAlchemy's own Python (compile, rows, pool)", ("sqlalchemy/",)),
    ("jsonschema", ("jsonschema/",)),
    (
        "Flask / werkzeug / flask-smorest / marshmallow",
        ("flask/", "werkzeug/", "flask_smorest/", "marshmallow/", "apispec/"),
    ),
    ("gunicorn", ("gunicorn/",)),
    ("Celery task tracing", ("celery/", "billiard/", "vine/")),
    ("our code", ("(app/", "(tasks/", "(workers/")),
)

# A sample counts when its thread is doing the work measured: running a Celery task
# (worker pool child) or handling a request (gunicorn gthread worker).
BUSY_MARKERS = ("trace_task (celery/app/trace.py", "handle_request (gunicorn/")
OURS = re.compile(r"^(.*) \(((?:app|tasks|workers)/[^:]+):\d+\)$")


def fold(raw_path: Path) -> dict:
    """Fold py-spy's raw ``--idle --threads`` output into buckets and our heaviest
    functions (inclusive), over the samples of busy threads only."""
    total = 0
    buckets: Counter = Counter()
    ours: Counter = Counter()
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not any(m in stack for m in BUSY_MARKERS):
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        total += count
        for frame in reversed(frames):
            bucket = next((b for b, keys in BUCKETS if any(k in frame for k in keys)), None)
            if bucket:
                buckets[bucket] += count
                break
        else:
            buckets["other"] += count
        seen = set()
        for frame in frames:
            match = OURS.match(frame)
            if match:
                key = f"{match.group(1)} ({match.group(2)})"
                if key not in seen:
                    seen.add(key)
                    ours[key] += count
    return {
        "samples": total,
        "buckets": {k: v / total for k, v in buckets.most_common()} if total else {},
        "ours_inclusive": {k: v / total for k, v in ours.most_common(25)} if total else {},
    }


def pyspy(
    pid: int, seconds: float, out: Path, subprocesses: bool = True, idle: bool = True
) -> subprocess.Popen:
    """py-spy on ``pid`` (and its children); ``idle``: sample threads that wait too
    (wall-clock view) rather than only those on a CPU (CPU view)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "200",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    if subprocesses:
        argv.append("--subprocesses")
    if idle:
        argv.append("--idle")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_steps(stack, seconds: float, out: Path) -> dict:
    """py-spy on the worker (all pool processes) while echo tasks run."""
    worker = stack.workers[0]
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            stack.run_tasks(20, 20)

    thread = threading.Thread(target=keep_busy, daemon=True)
    thread.start()
    time.sleep(1.0)
    folded = {}
    try:
        for view, idle in (("wall", True), ("cpu", False)):
            path = out.with_name(f"{out.stem}-{view}.txt")
            spy = pyspy(worker.pid, seconds, path, idle=idle)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode:
                raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")
            folded[view] = fold(path)
    finally:
        stop.set()
        thread.join(timeout=120)
    return folded


def profile_submit(stack, seconds: float, out: Path) -> dict:
    """py-spy on the web (gunicorn workers) under POST /v1/tasks at 16 connections."""
    folded = {}
    for view, idle in (("wall", True), ("cpu", False)):
        path = out.with_name(f"{out.stem}-{view}.txt")
        spy = pyspy(stack.web.pid, seconds, path, idle=idle)
        run_load(stack.port, stack.submit_request, connections=16, duration=seconds + 1, warmup=0.5)
        _, err = spy.communicate(timeout=60)
        if spy.returncode:
            raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")
        folded[view] = fold(path)
    return folded


def _statement_kind(sql: str) -> str:
    """A short name for a logged statement: its verb and table (several sent in one
    string: each, joined with ``+``; a data-modifying ``WITH``: its parts)."""
    parts = [p for p in sql.split(";") if p.strip()]
    if len(parts) > 1:
        return " + ".join(_statement_kind(p) for p in parts)
    words = sql.replace("(", " ").split()
    if words and words[0].upper() == "WITH":
        upper = [w.upper() for w in words]
        found = [
            f"{upper[i]} {words[i + (2 if upper[i] == 'INSERT' else 1)]}"
            for i in range(len(words) - 2)
            if upper[i] in ("INSERT", "UPDATE", "DELETE")
            and (upper[i] != "INSERT" or upper[i + 1] == "INTO")
            and (upper[i] != "DELETE" or upper[i + 1] == "FROM")
        ]
        return "WITH " + " + ".join(found) if found else "WITH"
    words = sql.replace("(", " ").split()
    if not words:
        return "?"
    verb = words[0].upper()
    if verb in ("BEGIN", "COMMIT", "ROLLBACK"):
        return verb
    if sql.strip().upper() == "SELECT 1":
        return "SELECT 1 (pool pre-ping)"
    if verb == "SELECT" and "pg_notify" in sql:
        return "SELECT pg_notify"
    upper = [w.upper() for w in words]
    marker = {"INSERT": "INTO", "UPDATE": "UPDATE"}.get(verb, "FROM")
    if marker in upper:
        i = upper.index(marker)
        if i + 1 < len(words):
            return f"{verb} {words[i + 1]}"
    return verb


def count_statements(
    infra: Infra,
    tasks: int = 5,
    steps: int = 20,
    code_root: str | None = None,
    name: str = "statements",
) -> dict:
    """Statements PostgreSQL receives per submission and per step (log_statement=all
    on a private server; each statement is one round trip, so a string of several
    statements sent at once counts once, under its first). Only the statements of this
    count's own database and of Outlast's connections (not the driver's) are counted.
    ``COMMIT`` per step is the commits per step."""
    from bench.outlast_side import OutlastStack

    if infra._pg is None:
        raise RuntimeError("statement counting needs the embedded PostgreSQL")
    with infra.admin.connect() as conn:
        conn.exec_driver_sql("ALTER SYSTEM SET log_line_prefix = '%%m [%%p] %%d %%a: '")
        conn.exec_driver_sql("ALTER SYSTEM SET log_statement = 'all'")
        conn.exec_driver_sql("SELECT pg_reload_conf()")
    log_path = infra._pg.data_dir / "log"
    stack = OutlastStack(infra, name=name, code_root=code_root)
    ours = f" {infra.database_name(name)} outlast:"
    try:
        stack.start_web()
        time.sleep(1.0)

        def since(offset: int) -> Counter:
            kinds: Counter = Counter()
            with open(log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            for line in text.splitlines():
                head, sep, sql = line.partition(" LOG:  statement: ")
                if sep and head.endswith(ours):
                    kinds[_statement_kind(sql)] += 1
            return kinds

        offset = log_path.stat().st_size
        stack.submit_many(tasks, {"message": "count", "steps": steps}, connections=1)
        time.sleep(0.5)
        per_submission = since(offset)
        offset = log_path.stat().st_size
        stack.start_worker()
        with stack.engine.connect() as conn:
            ids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM tasks")]
        stack.wait_terminal(ids, 120)
        time.sleep(1.0)  # what is deleted in bulk after the last publish
        per_step = since(offset)
    finally:
        stack.stop_workers()
        stack.close()
        with infra.admin.connect() as conn:
            conn.exec_driver_sql("ALTER SYSTEM RESET log_statement")
            conn.exec_driver_sql("ALTER SYSTEM RESET log_line_prefix")
            conn.exec_driver_sql("SELECT pg_reload_conf()")
    n_steps = tasks * steps
    return {
        "tasks": tasks,
        "steps": steps,
        "per_submission": {k: v / tasks for k, v in per_submission.most_common()},
        "per_step": {k: v / n_steps for k, v in per_step.most_common()},
    }


def render_statements(counted: dict) -> str:
    out = ["\n### Statements (round trips to PostgreSQL)\n"]
    for what, title in (("per_submission", "per POST /v1/tasks"), ("per_step", "per echo step")):
        rows = counted[what]
        out += [f"\n| {title} | count |", "|---|---:|"]
        out += [f"| `{k}` | {v:.2f} |" for k, v in rows.items()]
        out.append(f"| **total** | **{sum(rows.values()):.2f}** |")
    return "\n".join(out)


def render(name: str, views: dict) -> str:
    """Both views of one profile as markdown tables."""
    return "\n".join(
        render_view(f"{name}, {'wall clock (waits included)' if v == 'wall' else 'CPU only'}", f)
        for v, f in views.items()
    )


def render_view(name: str, folded: dict) -> str:
    lines = [
        f"\n### Profile: {name} ({folded['samples']} busy samples)\n",
        "| where | share |",
        "|---|---:|",
    ]
    for bucket, share in folded["buckets"].items():
        lines.append(f"| {bucket} | {share * 100:.0f}% |")
    lines += ["", "| our function (inclusive) | share |", "|---|---:|"]
    for frame, share in list(folded["ours_inclusive"].items())[:15]:
        lines.append(f"| `{frame}` | {share * 100:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile"))
    parser.add_argument("--what", default="statements,submit,steps")
    parser.add_argument("--root", default=None, help="count statements of another checkout")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench.outlast_side import OutlastStack

    infra = Infra()
    text = []
    try:
        stack = OutlastStack(infra)
        stack.start_web()
        what = args.what.split(",")
        if "statements" in what:
            text.append(render_statements(count_statements(infra, code_root=args.root)))
        if "submit" in what:
            text.append(
                render(
                    "POST /v1/tasks, web", profile_submit(stack, args.seconds, out / "submit.txt")
                )
            )
            stack.reset()
        if "steps" in what:
            stack.start_worker()
            stack.start_beat()
            stack.run_tasks(2, 2)
            text.append(
                render(
                    "echo steps, worker pool", profile_steps(stack, args.seconds, out / "steps.txt")
                )
            )
        stack.stop_workers()
        stack.close()
    finally:
        infra.close()
    report = "\n".join(text) + "\n"
    (out / "profile.md").write_text(report)
    print(report)
    return 0
