"""Where a worker pool child's memory grows: tracemalloc in the child itself.

``python -m bench.memtrace --tasks 3000`` starts Outlast's processes (one worker with a
single pool child, so every task runs in the same process), loads this module into the
worker through ``OUTLAST_AGENTS`` (it registers no agent, only Celery signal handlers),
runs one-step echo tasks, and prints the allocation sites that grew between a snapshot
taken after the warm-up and one at the end, with the child's RSS at both.

In the child: ``worker_process_init`` starts tracemalloc; ``task_postrun`` counts the
child's tasks and writes a snapshot at ``MEMTRACE_WARMUP`` tasks and every
``MEMTRACE_EVERY`` tasks after it to ``MEMTRACE_DIR`` (the driver compares them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

from celery.signals import task_postrun, worker_init, worker_process_init

FRAMES = 12
_count = 0


@worker_process_init.connect
def _start_tracing(**_: object) -> None:
    if os.environ.get("MEMTRACE_DIR"):
        tracemalloc.start(FRAMES)


def _trace_the_main_process(**_: object) -> None:
    """In a pool's main process (the consumer): trace, and write a snapshot each time
    the driver asks (a ``main-N.req`` file in ``MEMTRACE_MAIN_DIR``). Started when this
    module is imported there (the worker imports OUTLAST_AGENTS from its own
    ``worker_init`` handler, too late to be told of it)."""
    out = os.environ.get("MEMTRACE_MAIN_DIR")
    if not out or tracemalloc.is_tracing():
        return
    import threading

    tracemalloc.start(FRAMES)

    def serve() -> None:
        import psutil

        done: set[str] = set()
        while True:
            time.sleep(0.5)
            for req in sorted(Path(out).glob("main-*.req")):
                if req.name in done:
                    continue
                done.add(req.name)
                rss = psutil.Process().memory_info().rss
                n = int(req.stem.split("-")[1])
                path = Path(out) / f"{os.getpid()}-{n:07d}-{rss}.snap"
                tracemalloc.take_snapshot().dump(str(path))

    threading.Thread(target=serve, name="memtrace", daemon=True).start()


if os.path.basename(sys.argv[0]) == "celery" and "worker" in sys.argv:
    _trace_the_main_process()
worker_init.connect(_trace_the_main_process)


@task_postrun.connect
def _maybe_snapshot(**_: object) -> None:
    global _count
    out = os.environ.get("MEMTRACE_DIR")
    if not out or not tracemalloc.is_tracing():
        return
    _count += 1
    warmup = int(os.environ.get("MEMTRACE_WARMUP", "300"))
    every = int(os.environ.get("MEMTRACE_EVERY", "1000"))
    if _count == warmup or (_count > warmup and (_count - warmup) % every == 0):
        import psutil

        rss = psutil.Process().memory_info().rss
        path = Path(out) / f"{os.getpid()}-{_count:07d}-{rss}.snap"
        tracemalloc.take_snapshot().dump(str(path))


def compare(snapshots: list[Path], top: int = 15) -> str:
    """The sites that grew from the first snapshot to the last (traceback view)."""
    first, last = snapshots[0], snapshots[-1]
    a = tracemalloc.Snapshot.load(str(first))
    b = tracemalloc.Snapshot.load(str(last))
    noise = (
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    )
    a, b = a.filter_traces(noise), b.filter_traces(noise)
    tasks_a, rss_a = (int(x) for x in first.stem.split("-")[1:3])
    tasks_b, rss_b = (int(x) for x in last.stem.split("-")[1:3])
    n = tasks_b - tasks_a
    total = sum(s.size_diff for s in b.compare_to(a, "filename"))
    lines = [
        f"pool child {first.stem.split('-')[0]}: tasks {tasks_a} -> {tasks_b} ({n}); "
        f"RSS {rss_a / 2**20:.1f} -> {rss_b / 2**20:.1f} MiB "
        f"({(rss_b - rss_a) / max(n, 1):+.0f} B a task); traced Python memory "
        f"{total / 1024:+.1f} KiB ({total / max(n, 1):+.0f} B a task)",
        "",
        "| grew by | blocks | allocated at (innermost first) |",
        "|---:|---:|---|",
    ]
    for stat in b.compare_to(a, "traceback")[:top]:
        if stat.size_diff <= 0:
            continue
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in stat.traceback]
        where = " < ".join(reversed(frames[-6:]))
        lines.append(f"| {stat.size_diff / 1024:+.1f} KiB | {stat.count_diff:+d} | {where} |")
    return "\n".join(lines)


def group_memory(pid: int) -> dict[str, tuple[int, int]]:
    """``{process: (RSS, USS)}`` for the worker's processes: the supervisor, each pool's
    main process and the pool children (USS: pages no other process shares, so
    copy-on-write of memory inherited at fork shows as it happens)."""
    import psutil

    out = {}
    depth_names = ("supervisor", "pool main", "pool child")

    def walk(proc: psutil.Process, depth: int) -> None:
        try:
            info = proc.memory_full_info()
            hint = "steps" if "steps" in " ".join(proc.cmdline()) else ""
            children = proc.children()
        except psutil.Error:
            return
        name = depth_names[min(depth, 2)]
        out[f"{name} {proc.pid} {hint}".strip()] = (info.rss, info.uss)
        for child in children:
            walk(child, depth + 1)

    walk(psutil.Process(pid), 0)
    return out


def render_memory(before: dict, after: dict, tasks: int) -> str:
    lines = [
        "\n| process | RSS MiB before | after | per task | USS MiB before | after | per task |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (rss, uss) in before.items():
        if name not in after:
            continue
        rss2, uss2 = after[name]
        lines.append(
            f"| {name} | {rss / 2**20:.1f} | {rss2 / 2**20:.1f} | {(rss2 - rss) / tasks:+.0f} B | "
            f"{uss / 2**20:.1f} | {uss2 / 2**20:.1f} | {(uss2 - uss) / tasks:+.0f} B |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memtrace", description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--root", default=None, help="trace another checkout's worker")
    parser.add_argument(
        "--no-trace",
        action="store_true",
        help="no tracemalloc (it costs memory of its own): RSS and USS per process only",
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--main",
        action="store_true",
        help="trace the pools' main processes (the consumers) instead of the child",
    )
    args = parser.parse_args(argv)
    from bench.infra import Infra
    from bench.outlast_side import OutlastStack

    infra = Infra(keep_logs=True)
    snaps = infra.tmp / "memtrace"
    snaps.mkdir()
    env = {
        "OUTLAST_AGENTS": "bench.memtrace",
        "MEMTRACE_DIR": "" if args.no_trace or args.main else str(snaps),
        "MEMTRACE_MAIN_DIR": str(snaps) if args.main else "",
        "MEMTRACE_WARMUP": str(args.warmup),
        "MEMTRACE_EVERY": str(max(1, args.tasks - args.warmup)),
    }
    try:
        stack = OutlastStack(
            infra,
            worker_concurrency=args.concurrency,
            env=env,
            code_root=args.root,
            name="memtrace",
        )
        stack.start_web()
        stack.start_worker()
        stack.start_beat()
        t0 = time.monotonic()
        stack.rss_over_tasks(args.warmup, timeout=1800)
        time.sleep(1)
        before = group_memory(stack.workers[0].pid)
        if args.main:
            (snaps / f"main-{args.warmup}.req").touch()
            time.sleep(3)
        stack.rss_over_tasks(args.tasks, timeout=1800)
        time.sleep(2)
        after = group_memory(stack.workers[0].pid)
        if args.main:
            (snaps / f"main-{stack.completed_count()}.req").touch()
            time.sleep(5)
        print(f"{args.tasks} tasks in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        print(
            f"Worker memory per process, after {args.warmup} tasks of warm-up and then "
            f"after {args.tasks} more (one-step echo tasks):"
        )
        print(render_memory(before, after, args.tasks - args.warmup))
        print()
        found = sorted(snaps.glob("*.snap"))
        if args.main:  # one comparison per traced main process
            for pid in sorted({p.name.split("-")[0] for p in found}):
                print(compare(sorted(snaps.glob(f"{pid}-*.snap"))).replace("pool child", "main"))
                print()
            found = []
        if args.no_trace or args.main:
            found = []
            stack.stop_workers()
            stack.close()
            infra.keep_logs = False
            return 0
        if len(found) < 2:
            print(f"only {len(found)} snapshots written", file=sys.stderr)
            return 1
        print(compare(found))
        stack.stop_workers()
        stack.close()
        infra.keep_logs = False
    except BaseException:
        print(f"failed; logs in {infra.log_dir}", file=sys.stderr)
        raise
    finally:
        infra.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
