"""``python -m bench.assistant_turn [--turns N]``: the engine's own cost of one
``assistant`` turn (one model call and one HTTP tool call) beside one ``echo`` step.

Everything but the model and the tool is measured: a stub model and a stub tool answer
instantly from a subprocess of their own (so their CPU is not counted), and this process
runs the steps itself with the engine's ``run_step`` (lease, checkpoint in, agent step,
tool-call log, usage, checkpoint out, the next step's outbox row and its publish to
Redis). Reported per turn (per step for echo): this process's CPU ms (user + system)
and the PostgreSQL transactions it committed. PostgreSQL's and Redis's own CPU are not
in the figure (the ``steps`` section of ``bench.run`` measures those for echo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

from bench.infra import ROOT, Infra, wait_for


def serve_stub(port: int, turns: int) -> None:
    """The stub model (``/v1/chat/completions``) and tool (``/tool``)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
            if self.path.startswith("/tool"):
                answer: dict = {"ok": True}
            else:
                turn = sum(1 for m in body["messages"] if m.get("role") == "assistant")
                if turn < turns:
                    arguments = json.dumps({"n": turn})
                    call = {
                        "id": f"c{turn}",
                        "type": "function",
                        "function": {"name": "tool", "arguments": arguments},
                    }
                    message = {"role": "assistant", "content": None, "tool_calls": [call]}
                else:
                    message = {"role": "assistant", "content": "done"}
                answer = {
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                }
            payload = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def drive(task_id: str) -> int:
    """Run the task's steps in this process until it settles; the steps run."""
    from app.engine.runner import run_step
    from app.store import db, lifecycle

    steps = 0
    while True:
        with db.engine().connect() as conn:
            row = lifecycle.get(conn, task_id)
        if row["status"] not in ("pending", "working"):
            assert row["status"] == "completed", (row["status"], row["error"])
            return steps
        run_step(task_id, row["step"])
        steps += 1


def measure(agent: str, input: dict, tenant_id: str, tasks: int) -> dict[str, float]:
    from app.store import db, lifecycle, outbox

    commits = 0

    def count(_conn: object) -> None:
        nonlocal commits
        commits += 1

    ids = []
    with db.transaction() as conn:
        for _ in range(tasks):
            row = lifecycle.create(
                conn,
                tenant_id=tenant_id,
                agent=agent,
                input=input,
                metadata={},
                webhook_url=None,
                timeout_seconds=None,
                idempotency_key=None,
            )
            outbox.add_step(conn, row["id"], 0)
            ids.append(row["id"])
    sa.event.listen(db.engine(), "commit", count)
    cpu, wall = time.process_time(), time.perf_counter()
    steps = sum(drive(task_id) for task_id in ids)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sa.event.remove(db.engine(), "commit", count)
    return {
        "steps": steps,
        "cpu_ms": 1000 * cpu / steps,
        "wall_ms": 1000 * wall / steps,
        "commits": commits / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=50, help="tool-calling turns per task")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--stub", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub:
        serve_stub(args.stub, args.turns)
        return

    from app import settings as settings_mod
    from app.settings import Settings
    from app.store import db, tenants
    from workers.celery_app import create_app

    infra = Infra()
    stub = None
    try:
        port = infra.free_port()
        stub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.assistant_turn",
                "--stub",
                str(port),
                "--turns",
                str(args.turns),
            ],
            cwd=ROOT,
        )
        database_url = infra.create_database("assistant_turn")
        db.upgrade(database_url)
        settings = Settings.from_env(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": infra.redis_url("outlast"),
                "OUTLAST_LLM_BASE_URL": f"http://127.0.0.1:{port}/v1",
                "OUTLAST_WEBHOOK_ALLOW_PRIVATE": "1",
                "OUTLAST_LOG_LEVEL": "WARNING",
            }
        )
        create_app(settings)  # the Celery app that publishes the next step
        settings_mod.configure(settings)
        with db.transaction() as conn:
            tenant = tenants.create(conn, "bench")
        wait_for(lambda: _up(port), 30, "the stub")
        http_tools = [
            {
                "name": "tool",
                "url": f"http://127.0.0.1:{port}/tool",
                "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
            }
        ]
        assistant_input = {
            "prompt": "go",
            "http_tools": http_tools,
            "max_turns": 200,
            "ask_human": False,
        }
        echo_input = {"message": "hi", "steps": args.turns, "step_seconds": 0}
        measure("echo", echo_input, tenant.tenant_id, 1)  # warm-up
        results = {}
        for _ in range(2):  # alternate, keep the second round
            results["echo step"] = measure("echo", echo_input, tenant.tenant_id, args.tasks)
            results["assistant turn"] = measure(
                "assistant", assistant_input, tenant.tenant_id, args.tasks
            )
        print("| unit | steps measured | engine CPU ms | wall ms | commits |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| {name} | {r['steps']} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | "
                f"{r['commits']:.1f} |"
            )
    finally:
        if stub is not None:
            stub.kill()
            stub.wait()
        db.dispose()
        infra.close()


def _up(port: int) -> bool:
    import requests

    try:
        requests.post(f"http://127.0.0.1:{port}/tool", json={}, timeout=1)
        return True
    except requests.RequestException:
        return False


if __name__ == "__main__":
    main()
