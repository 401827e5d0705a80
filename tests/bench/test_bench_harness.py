"""The benchmark harness still runs (speed itself is measured by ``make bench``, never
asserted here): the load generator counts what it sends, and a minimal run measures
Outlast beside raw Celery with real processes, and stops them all."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import run as bench_run
from bench.loadgen import http_request, run_load
from bench.stats import percentile


class _Accepted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(202)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def accepting_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accepted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_percentile_interpolates_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_load_generator_sends_exactly_max_requests_and_times_each(accepting_server):
    port = accepting_server

    def request(i: int) -> bytes:
        return http_request("POST", "/x", f"127.0.0.1:{port}", {"X-N": str(i)}, b"{}")

    result = run_load(port, request, connections=3, duration=30, warmup=0, max_requests=25)

    assert result.requests == 25
    assert result.statuses == {202: 25}
    assert result.errors == 0
    assert all(latency > 0 for latency in result.latencies)


@pytest.mark.slow
def test_minimal_bench_run_measures_outlast_beside_its_baselines(tmp_path):
    code = bench_run.main(
        ["--size", "smoke", "--only", "submit,latency", "--no-plots", "--out", str(tmp_path)]
    )

    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert "outlast_skipped" not in results, results.get("outlast_skipped")
    assert set(results["submit"]["16"]) == {"noop", "naive", "outlast"}
    for runs in results["submit"]["16"].values():
        assert runs[0]["requests"] > 0
        assert set(runs[0]["statuses"]) == {"202"}
    assert len(results["latency"]["outlast"]) == len(results["latency"]["raw_celery"]) > 0
    # the synchronous answer (Prefer: wait) beside the long poll, as many samples
    assert len(results["latency"]["outlast_prefer_wait"]) == len(results["latency"]["outlast"])
    report = (tmp_path / "report.md").read_text()
    assert "### Submission" in report and "### One-step end-to-end latency" in report


def test_step_floor_measures_each_piece_and_both_index_sets(database_url):
    """``python -m bench.step_floor`` (docs/benchmarks.md, issue 18's second round) still
    runs against a real server and prints a figure for every row it documents."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "bench.step_floor", "--n", "30", "--tasks", "3", "--steps", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    figures = [row for row in rows if row.split("|")[2].strip().replace(".", "").isdigit()]
    assert len(figures) == 6 + 2, done.stdout  # six pieces, the two index sets
    assert "| as migrated |" in done.stdout and "fillfactor 50 |" in done.stdout


def test_step_profile_runs_each_step_to_its_next_and_reports_its_cost(database_url, redis_url):
    """``python -m bench.step_profile`` (docs/benchmarks.md) still drives run_step through
    whole steps in one process: every step continues to the next, and it prints the cost."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "bench.step_profile", "--tasks", "2", "--steps", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(
        r"^6 steps \{'continued': 6\}: CPU [\d.]+ ms/step, wall [\d.]+ ms/step$",
        done.stdout,
        re.MULTILINE,
    ), done.stdout
