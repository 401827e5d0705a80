"""Guarantees of the tool-call log (V2.md 12): a re-run that asks a logged call index
with other arguments fails the task with ``nondeterministic_replay`` (the stored output
is never returned for arguments it was not made with); a tool output holding NUL
characters or NaN (which PostgreSQL's jsonb refuses) is stored without them and the task
goes on, and ``research`` records such a page as a source.
"""

from __future__ import annotations

import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT
from tests.faults.conftest import Client, new_tenant, query
from tests.harness import wait_until

pytestmark = pytest.mark.faults

# The agents are importable by every process the test starts.
AGENTS = {"OUTLAST_AGENTS": "tests.faults.replay_agents", "PYTHONPATH": str(ROOT)}
HOLD = 60.0


def test_other_arguments_at_a_logged_call_index_after_a_kill_fail_the_task_nondeterministic_replay(
    stack, procs, ledger, watcher, database_url
):
    # Given web, beat and two workers, and an agent whose call 0 carries its attempt
    stack.env.update(AGENTS)
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.add_rule(lambda r: r.path == "/hold", delay=HOLD, times=1)
    task = api.create("test_attempt_in_args", {"url": ledger.url})
    watcher.track(task["id"])

    # When call 0 completed, call 1 is in flight, and its worker is SIGKILLed
    held = wait_until(
        lambda: [r for r in ledger.snapshot("/hold") if r.answered is None], 30, what="call 1"
    )[0]
    procs.kill(procs.holder_of(held))

    # Then the re-run (attempt 2) asks call 0 with other arguments, and the task fails
    # with nondeterministic_replay instead of getting attempt 1's output back
    done = api.wait_terminal(task["id"], timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "nondeterministic_replay", done["error"]
    assert "other arguments" in done["error"]["message"]
    assert done["attempt"] == 2
    assert len(ledger.snapshot("/first")) == 1, "call 0 must not be made again"
    assert len(ledger.snapshot("/hold")) == 1, "nothing after the mismatch may run"
    (row,) = query(
        database_url,
        "SELECT args, args_hash FROM tool_calls WHERE task_id = :t AND call_index = 0",
        t=task["id"],
    )
    assert row["args"]["json"] == {"attempt": 1} and len(row["args_hash"]) == 64


class _Pages:
    """A page server standing in for the web: HTML with NUL bytes, JSON with NaN."""

    PAGES = {
        "/nul.html": (
            "text/html; charset=utf-8",
            b"<html><head><title>Null\x00 bytes</title></head>"
            b"<body><p>before\x00after</p></body></html>",
        ),
        "/plain.txt": ("text/plain", b"one\x00two three"),
        "/nan.json": (
            "application/json",
            b'{"value": NaN, "list": [1, Infinity], "s": "a\\u0000b"}',
        ),
    }

    def __init__(self) -> None:
        pages = self.PAGES

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                content_type, body = pages.get(self.path, ("text/plain", b"missing"))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(200 if self.path in pages else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pages():
    p = _Pages()
    yield p
    p.close()


def test_nul_bytes_and_nan_in_tool_outputs_are_stored_without_them_and_the_tasks_complete(
    stack, procs, watcher, database_url, pages
):
    # Given the stack and pages whose text holds NUL bytes, and a JSON answer with NaN
    stack.env.update(AGENTS)
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)

    # When research reads the pages and an agent gets the NaN answer
    research = api.create(
        "research",
        {"question": "what is there?", "urls": [pages.url + "/nul.html", pages.url + "/plain.txt"]},
    )
    nan = api.create("test_post_once", {"url": pages.url + "/nan.json"})
    for task in (research, nan):
        watcher.track(task["id"])
    done = api.wait_all_terminal([research["id"], nan["id"]], timeout=60)

    # Then both complete; research lists the pages as sources
    assert {d["status"] for d in done.values()} == {"completed"}, done
    sources = done[research["id"]]["result"]["sources"]
    assert [s["url"] for s in sources] == [pages.url + "/nul.html", pages.url + "/plain.txt"]
    assert sources[0]["title"] == "Null bytes" and sources[0]["status"] == 200
    assert "error" not in sources[0]
    # and the NaN became null, the NUL was dropped
    assert done[nan["id"]]["result"]["body"] == {"value": None, "list": [1, None], "s": "ab"}
    texts = query(
        database_url,
        "SELECT output->>'text' AS text FROM tool_calls WHERE task_id = :t ORDER BY step_index",
        t=research["id"],
    )
    assert texts[0]["text"] and "before" in texts[0]["text"] and "after" in texts[0]["text"]
    assert texts[1]["text"] == "one two three"


def test_a_worker_paused_past_its_lease_cannot_overwrite_the_newer_executions_call(
    stack, procs, ledger, watcher, database_url
):
    # Given two workers and a one-call task whose call is held open for a while
    tenant = new_tenant(database_url)
    procs.start("web", "beat", "worker", "worker")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    ledger.hold_call(step=0, seconds=8.0, times=1)
    task = api.create("calls", {"url": ledger.url + "/calls", "calls": 1})
    watcher.track(task["id"])
    first = ledger.wait_in_flight(task["id"], step=0)

    # When the worker making the call is paused (SIGSTOP) past its lease
    zombie = procs.holder_of(first)
    zombie.signal_group(signal.SIGSTOP)
    try:
        # Then the other worker makes the call again with the same key and completes it
        done = api.wait_terminal(task["id"], timeout=60)
        assert done["status"] == "completed" and done["attempt"] == 2, done
        calls = ledger.snapshot("/calls", task["id"])
        assert len(calls) == 2 and calls[0].key == calls[1].key
        wait_until(lambda: first.answered is not None, 20, what="the paused call answered")
    finally:
        # When the paused worker resumes, with the held call's answer waiting for it
        zombie.signal_group(signal.SIGCONT)
    time.sleep(3.0)  # it reads the answer, tries to log it, and is fenced off

    # Then the log keeps the newer execution's output: the first writer won
    (row,) = query(
        database_url,
        "SELECT output, attempts FROM tool_calls WHERE task_id = :t AND call_index = 0",
        t=task["id"],
    )
    assert row["output"]["body"]["seq"] == calls[1].seq, (row, calls)
    assert api.get(task["id"])["result"] == done["result"]
