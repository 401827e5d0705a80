"""The benchmark's tables (markdown, as docs/benchmarks.md shows them) and plots."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from bench.stats import fmt, median, percentile, ratio

NAMES = {
    "outlast": "Outlast (echo)",
    "variant": "Outlast variant (--variant)",
    "outlast_prefer_wait": "Outlast (echo), `POST` with `Prefer: wait`",
    "variant_prefer_wait": "Outlast variant, `POST` with `Prefer: wait`",
    "raw_celery": "raw Celery",
    "pg_checkpoint": "hand-rolled PG checkpoint",
    "dbos": "DBOS Transact",
    "noop": "`return 202`",
    "naive": "naive insert + .delay()",
}


def machine_meta() -> dict:
    """The machine and the moment: nproc, memory, CPU model, date, commit."""

    def run(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "memory": mem_total,
        "cpu": cpu,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "commit": run("git", "rev-parse", "--short", "HEAD"),
    }


def _col(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


def _pass(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "met" if ok else "**missed**"


OUTLASTS = ("variant", "outlast")  # the --variant (before) first, then this checkout


def render(results: dict) -> str:
    """The run's report in markdown."""
    global NAMES
    out: list[str] = []
    meta = results["meta"]
    saved = NAMES
    label = meta.get("variant_label")
    if label:
        NAMES = {**NAMES, "variant": label, "variant_prefer_wait": f"{label}, `Prefer: wait`"}
    try:
        return _render(results, out, meta)
    finally:
        NAMES = saved


def _render(results: dict, out: list[str], meta: dict) -> str:
    out.append(
        f"Run of {meta['date']} on {meta['nproc']} cores ({meta['cpu']}), {meta['memory']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in meta['loadavg_at_start'])}; "
        f"commit {meta['commit']}; size `{meta.get('size', '?')}`."
    )
    if results.get("skipped_sections"):
        out.append(
            f"\nSkipped to stay within the time budget: {', '.join(results['skipped_sections'])} "
            "(the machine was slower than usual; run them with --only)."
        )
    if results.get("outlast_skipped"):
        out.append(f"\nOutlast not measured: {results['outlast_skipped']}")
    goals: list[tuple[str, str, str]] = []
    # goal -> contender -> (measured, verdict): each Outlast beside the --variant
    versus: dict[str, dict[str, tuple[str, str]]] = {}

    def goal(name: str, contender: str, value: float, text: str, ok: bool | None) -> None:
        """``ok`` None: a figure shown beside the goals, not a goal."""
        if not math.isnan(value):
            verdict = "" if ok is None else _pass(ok)
            versus.setdefault(name, {})[contender] = (text, verdict)

    counted = results.get("statements")
    if counted:
        out.append(render_statement_counts(counted))
        for c, rows in counted.items():
            commits = rows["per_step"].get("COMMIT", 0.0)
            total = sum(rows["per_step"].values())
            goal("commits per echo step <= 2", c, commits, f"{commits:.2f}", commits <= 2.005)
            goal("statements per echo step", c, total, f"{total:.1f}", None)
            sub = rows["per_submission"].get("COMMIT", 0.0)
            goal("commits per submission", c, sub, f"{sub:.2f}", sub <= 1.005)

    steps = results.get("steps")
    if steps:
        size = results["size"]
        out.append(
            f"\n### Step throughput and per-step latency\n\n"
            f"{size['chains']} concurrent chains/tasks of {size['steps']} trivial steps, "
            f"{size['rounds']} rounds alternating the contenders; one worker with two "
            f"processes each (Celery prefork concurrency 2; DBOS: two processes). "
            f"Medians over rounds.\n"
        )
        out.append(
            "| contender | steps/s (many) | ms per step (one alone) | "
            "throughput vs raw Celery | vs DBOS | latency vs raw Celery |"
        )
        out.append("|---|---:|---:|---:|---:|---:|")
        tput = {c: median(_col(runs, "steps_per_s")) for c, runs in steps["many"].items()}
        lat = {c: median(_col(runs, "ms_per_step")) for c, runs in steps["alone"].items()}
        for c in steps["many"]:
            out.append(
                f"| {NAMES[c]} | {fmt(tput[c])} | {fmt(lat[c], 2)} | "
                f"{fmt(ratio(tput[c], tput.get('raw_celery', math.nan)), 2)}x | "
                f"{fmt(ratio(tput[c], tput.get('dbos', math.nan)), 2)}x | "
                f"{fmt(ratio(lat[c], lat.get('raw_celery', math.nan)), 2)}x |"
            )
        out.append(render_cpu(steps["many"], results["meta"].get("nproc") or 2))
        for c in OUTLASTS:
            if c not in tput:
                continue
            for base, label, target in (
                ("raw_celery", "raw Celery", 0.75),
                ("pg_checkpoint", "hand-rolled PG checkpoint", 1.0),
            ):
                r = ratio(tput[c], tput.get(base, math.nan))
                goal(f"step throughput >= {target}x {label}", c, r, f"{r:.2f}x", r >= target)
            cpu = cpu_per_step(steps["many"][c])
            goal("CPU per step, all processes <= 13 ms", c, cpu, f"{cpu:.1f} ms", cpu <= 13)
        if "outlast" in tput:
            r_raw = ratio(tput["outlast"], tput.get("raw_celery", math.nan))
            r_dbos = ratio(tput["outlast"], tput.get("dbos", math.nan))
            if not math.isnan(r_raw):
                goals.append(
                    ("step throughput >= 0.75x raw Celery", f"{r_raw:.2f}x", _pass(r_raw >= 0.75))
                )
            if not math.isnan(r_dbos):
                goals.append(
                    ("step throughput >= 1.5x DBOS", f"{r_dbos:.2f}x", _pass(r_dbos >= 1.5))
                )

    submit = results.get("submit")
    if submit:
        size = results["size"]
        out.append(
            f"\n### Submission\n\ngunicorn gthread 2 workers x 4 threads for every endpoint, "
            f"closed-loop keep-alive connections, {size['submit_seconds']:.0f} s measured after "
            f"{size['submit_warmup']:.0f} s warm-up, {size['submit_rounds']} rounds; no worker "
            f"consumes meanwhile. Medians over rounds.\n"
        )
        out.append(
            "| endpoint | connections | requests/s | p50 ms | p99 ms | rps vs naive | "
            "p99 vs naive | load generator CPU |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for conns, by_name in submit.items():
            rps = {n: median(_col(runs, "rps")) for n, runs in by_name.items()}
            p99 = {n: median(_col(runs, "p99_ms")) for n, runs in by_name.items()}
            for name, runs in by_name.items():
                cpu_share = median(
                    [r["loadgen_cpu_s"] / (r["requests"] / r["rps"]) for r in runs if r["rps"]]
                )
                bad = sum(sum(v for k, v in r["statuses"].items() if int(k) >= 300) for r in runs)
                note = f" ({bad} non-2xx)" if bad else ""
                out.append(
                    f"| {NAMES[name]}{note} | {conns} | {fmt(rps[name])} | "
                    f"{fmt(median(_col(runs, 'p50_ms')))} | {fmt(p99[name])} | "
                    f"{fmt(ratio(rps[name], rps.get('naive', math.nan)), 2)}x | "
                    f"{fmt(ratio(p99[name], p99.get('naive', math.nan)), 2)}x | "
                    f"{cpu_share * 100:.0f}% of a core |"
                )
            for c in OUTLASTS:
                if c in rps:
                    r = ratio(rps[c], rps["naive"])
                    goal(
                        f"submission rps >= 1.0x naive at {conns} conns", c, r, f"{r:.2f}x", r >= 1
                    )
                    q = ratio(p99[c], p99["naive"])
                    goal(f"submission p99 <= naive at {conns} conns", c, q, f"{q:.2f}x", q <= 1)
            if "outlast" in rps:
                r = ratio(rps["outlast"], rps["naive"])
                goals.append(
                    (f"submission rps >= 1.0x naive at {conns} conns", f"{r:.2f}x", _pass(r >= 1.0))
                )
                if conns == "16":
                    q = ratio(p99["outlast"], p99["naive"])
                    goals.append(
                        ("submission p99 <= naive at 16 conns", f"{q:.2f}x", _pass(q <= 1.0))
                    )

    latency = results.get("latency")
    if latency:
        out.append(
            "\n### One-step end-to-end latency\n\nOutlast: `POST /v1/tasks` (echo, 1 step) "
            "then `GET /v1/tasks/{id}?wait=30` until the client sees `completed`; with "
            "`Prefer: wait`: the `POST` alone, answered `200` with the completed task "
            "(V2.md 3). Raw Celery: `.delay().get()` of a task that returns at once (Redis "
            "result backend). Samples interleaved.\n"
        )
        out.append("| path | samples | p50 ms | p90 ms | p99 ms | p50 vs raw Celery |")
        out.append("|---|---:|---:|---:|---:|---:|")
        base = percentile(latency["raw_celery"], 50)
        for name, samples in latency.items():
            p50 = percentile(samples, 50)
            out.append(
                f"| {NAMES[name]} | {len(samples)} | {fmt(p50 * 1000, 2)} | "
                f"{fmt(percentile(samples, 90) * 1000, 2)} | "
                f"{fmt(percentile(samples, 99) * 1000, 2)} | {fmt(ratio(p50, base), 2)}x |"
            )
        for c in OUTLASTS:
            if c in latency:
                r = ratio(percentile(latency[c], 50), base)
                goal("one-step e2e p50 <= 3x raw Celery round trip", c, r, f"{r:.2f}x", r <= 3)
        for c in OUTLASTS:
            if f"{c}_prefer_wait" in latency:
                r = ratio(percentile(latency[f"{c}_prefer_wait"], 50), base)
                what = "one-step e2e p50 with Prefer: wait <= 3x raw Celery round trip"
                goal(what, c, r, f"{r:.2f}x", r <= 3)
        if "outlast" in latency:
            r = ratio(percentile(latency["outlast"], 50), base)
            goals.append(
                ("one-step e2e p50 <= 3x raw Celery round trip", f"{r:.2f}x", _pass(r <= 3))
            )

    recovery = results.get("recovery")
    if recovery and recovery["runs"]:
        bound = recovery["lease_seconds"] + recovery["reaper_interval_seconds"] + 1
        out.append(
            f"\n### Recovery after SIGKILL\n\nA worker running an echo task (0.5 s steps) is "
            f"SIGKILLed mid-step while a second worker idles; lease "
            f"{recovery['lease_seconds']:.0f} s, reaper interval "
            f"{recovery['reaper_interval_seconds']:.0f} s. Time from the kill to the "
            f"interrupted step's checkpoint.\n"
        )
        out.append(
            "| run | step | seconds to next checkpoint | attempt | within lease + reaper + 1 s |"
        )
        out.append("|---:|---:|---:|---|---|")
        worst = 0.0
        for i, run in enumerate(recovery["runs"], 1):
            worst = max(worst, run["next_checkpoint_after"])
            out.append(
                f"| {i} | {run['step']} | {run['next_checkpoint_after']:.2f} | "
                f"{run['attempt_before']} -> {run['attempt_after']} | "
                f"{_pass(run['next_checkpoint_after'] <= bound)} |"
            )
        goals.append(
            (f"recovery within {bound:.0f} s", f"worst {worst:.2f} s", _pass(worst <= bound))
        )

    rss = results.get("rss")
    if rss:
        out.append(
            "\n### Worker memory\n\nResident memory of the worker (main process and pool "
            "children) while it runs one-step tasks.\n"
        )
        out.append("| worker | tasks | RSS at start MiB | RSS at end MiB | growth MiB |")
        out.append("|---|---:|---:|---:|---:|")
        for name, samples in rss.items():
            start, end = samples[0][1] / 2**20, samples[-1][1] / 2**20
            out.append(
                f"| {NAMES[name]} | {samples[-1][0]} | {start:.0f} | {end:.0f} | {end - start:+.0f} |"
            )

    scale = results.get("scale")
    if scale:
        out.append(render_scale(scale, goals))

    if versus:
        present = [c for c in OUTLASTS if any(c in row for row in versus.values())]
        out.append("\n### Goals, before and after (same run)\n")
        out.append("| goal | " + " | ".join(NAMES[c] for c in present) + " |")
        out.append("|---|" + "---:|" * len(present))
        for name, row in versus.items():
            cells = [
                "-" if c not in row else row[c][0] + (f" ({row[c][1]})" if row[c][1] else "")
                for c in present
            ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    if goals:
        out.append("\n### Goals (same-run ratios)\n")
        out.append("| goal | measured | |")
        out.append("|---|---:|---|")
        for goal, value, verdict in goals:
            out.append(f"| {goal} | {value} | {verdict} |")
    return "\n".join(out) + "\n"


CPU_COMPONENTS = (
    ("worker", ("outlast-worker", "variant-worker", "baseline-worker", "dbos")),
    ("PostgreSQL", ("postgres",)),
    ("Redis", ("redis",)),
    ("web (submission)", ("outlast-web", "variant-web")),
    ("beat", ("outlast-beat", "variant-beat")),
)


def cpu_per_step(runs: list[dict]) -> float:
    """Median over rounds of the CPU ms per step of every process of the run."""
    keys = {k for _, names in CPU_COMPONENTS for k in names}
    return median(
        [sum(v for k, v in r.get("cpu_ms_per_step", {}).items() if k in keys) for r in runs]
    )


def render_statement_counts(counted: dict) -> str:
    """Statements (round trips) and commits per echo step and per submission, side by
    side for each checkout counted."""
    names = list(counted)
    out = [
        "\n### Statements and commits (PostgreSQL's log, log_statement=all)\n",
        "Each logged statement is one round trip; `COMMIT` counts commits.\n",
    ]
    for what, title in (("per_step", "per echo step"), ("per_submission", "per POST /v1/tasks")):
        kinds: list[str] = []
        for c in names:
            kinds += [k for k in counted[c][what] if k not in kinds]
        out.append(f"\n| {title} | " + " | ".join(NAMES[c] for c in names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for kind in kinds:
            cells = [fmt(counted[c][what].get(kind, 0.0), 2) for c in names]
            out.append(f"| `{kind}` | " + " | ".join(cells) + " |")
        totals = [f"**{sum(counted[c][what].values()):.2f}**" for c in names]
        out.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(out)


def render_cpu(many: dict, cores: int) -> str:
    """CPU milliseconds per step by component, and the ceiling that puts on throughput."""
    out = [
        "\nCPU per step (all processes of the run, measured with psutil; the driver "
        f"excluded). With {cores} cores shared by everything, {cores} x 1000 / total is "
        "the most steps/s the machine could give that contender.\n",
        "| contender | " + " | ".join(c for c, _ in CPU_COMPONENTS) + " | total CPU ms/step | "
        "ceiling steps/s | measured / ceiling |",
        "|---|" + "---:|" * (len(CPU_COMPONENTS) + 3),
    ]
    for name, runs in many.items():
        cells = []
        total = 0.0
        for _, keys in CPU_COMPONENTS:
            value = median(
                [sum(v for k, v in r.get("cpu_ms_per_step", {}).items() if k in keys) for r in runs]
            )
            total += 0.0 if math.isnan(value) else value
            cells.append(fmt(value, 2))
        ceiling = cores * 1000.0 / total if total else math.nan
        measured = median(_col(runs, "steps_per_s"))
        out.append(
            f"| {NAMES[name]} | " + " | ".join(cells) + f" | {fmt(total, 2)} | "
            f"{fmt(ceiling)} | {fmt(ratio(measured, ceiling), 2)} |"
        )
    return "\n".join(out)


def render_scale(scale: dict, goals: list | None = None) -> str:
    """The read-latency-at-scale table."""
    out = [
        f"\n### Reads at scale\n\n{scale['connections']} closed-loop connections, "
        f"{scale['seconds']:.0f} s per endpoint and size, sizes alternated. p50/p99 in ms.\n"
    ]
    sizes = list(scale["sizes"])
    header = "| endpoint | " + " | ".join(
        f"{s['tasks']:,} tasks / {s['events']:,} events p50 | p99" for s in scale["sizes"].values()
    )
    out.append(header + " | p99 ratio |")
    out.append("|---|" + "---:|---:|" * len(sizes) + "---:|")
    for endpoint in scale["endpoints"]:
        cells = []
        p99s = []
        for size in sizes:
            runs = scale["sizes"][size]["results"][endpoint]
            p50 = median(_col(runs, "p50_ms"))
            p99 = median(_col(runs, "p99_ms"))
            p99s.append(p99)
            cells.append(f"{fmt(p50, 2)} | {fmt(p99, 2)}")
        r = ratio(p99s[-1], p99s[0])
        out.append(f"| `{endpoint}` | " + " | ".join(cells) + f" | {fmt(r, 2)}x |")
        if goals is not None:
            goals.append((f"`{endpoint}` p99 flat (within 2x)", f"{r:.2f}x", _pass(r <= 2)))
    return "\n".join(out)


def plot(results: dict, out_dir: Path) -> list[Path]:
    """PNG plots of the run into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    colors = {
        "outlast": "#2b6cb0",
        "variant": "#805ad5",
        "outlast_prefer_wait": "#63b3ed",
        "variant_prefer_wait": "#b794f4",
        "raw_celery": "#718096",
        "pg_checkpoint": "#d69e2e",
        "dbos": "#38a169",
        "noop": "#a0aec0",
        "naive": "#dd6b20",
    }
    steps = results.get("steps")
    if steps:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(steps["many"])
        for ax, key, runs_by, title in (
            (a, "steps_per_s", steps["many"], "steps/s, concurrent chains (higher is better)"),
            (b, "ms_per_step", steps["alone"], "ms per step, one chain alone (lower is better)"),
        ):
            values = [median(_col(runs_by[n], key)) for n in names]
            ax.bar(range(len(names)), values, color=[colors[n] for n in names])
            for i, n in enumerate(names):
                ax.scatter(
                    [i] * len(runs_by[n]), _col(runs_by[n], key), color="black", s=8, zorder=3
                )
            ax.set_xticks(
                range(len(names)),
                [NAMES[n].replace("hand-rolled ", "") for n in names],
                rotation=15,
            )
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / "bench_steps.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    submit = results.get("submit")
    if submit:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        conns = list(submit)
        names = list(submit[conns[0]])
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + j * width for i in range(len(conns))]
            a.bar(
                xs,
                [median(_col(submit[c][name], "rps")) for c in conns],
                width,
                label=NAMES[name],
                color=colors[name],
            )
            b.bar(
                xs,
                [median(_col(submit[c][name], "p99_ms")) for c in conns],
                width,
                label=NAMES[name],
                color=colors[name],
            )
        for ax, title in ((a, "requests/s (higher is better)"), (b, "p99 ms (lower is better)")):
            ax.set_xticks(
                [i + width * (len(names) - 1) / 2 for i in range(len(conns))],
                [f"{c} connections" for c in conns],
            )
            ax.set_title(title, fontsize=10)
        a.set_yscale("log")
        b.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        paths.append(out_dir / "bench_submission.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    latency = results.get("latency")
    if latency:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, samples in latency.items():
            xs = sorted(s * 1000 for s in samples)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, label=NAMES[name], color=colors[name])
        ax.set_xscale("log")
        ax.set_xlabel("ms, submit to the client seeing the result")
        ax.set_ylabel("fraction of samples")
        ax.set_title("one-step end-to-end latency (CDF)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        paths.append(out_dir / "bench_latency.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    rss = results.get("rss")
    if rss:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, samples in rss.items():
            ax.plot(
                [s[0] for s in samples],
                [s[1] / 2**20 for s in samples],
                label=NAMES[name],
                color=colors[name],
            )
        ax.set_xlabel("tasks completed")
        ax.set_ylabel("worker RSS (main + 2 pool processes), MiB")
        ax.set_ylim(bottom=0)
        ax.set_title("worker memory across tasks", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        paths.append(out_dir / "bench_rss.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def merge(paths: list[Path]) -> dict:
    """One result from several runs' results.json (later sections replace earlier ones;
    each section's ratios are still within one run)."""
    merged: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for key, value in data.items():
            if key == "meta":
                merged.setdefault("meta", value)
                merged.setdefault("runs", []).append(value)
            elif key != "skipped_sections":
                merged[key] = value
    return merged


def main(argv: list[str]) -> int:
    """``python -m bench.report OUT RESULTS.json...``: merged report and plots in OUT."""
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    results = merge([Path(p) for p in argv[1:]])
    text = render(results)
    (out / "report.md").write_text(text)
    print(text)
    for path in plot(results, out):
        print(path)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
