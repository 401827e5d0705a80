"""The Python client against the real stack (web, worker and beat subprocesses)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from outlast.client import (
    Client,
    IdempotencyKeyReused,
    NetworkError,
    NotFound,
    TaskNotTerminal,
    TaskNotWaiting,
    TaskTerminal,
    Unauthorized,
    ValidationError,
    WaitTimeout,
    WebhookVerificationError,
    verify_webhook,
)
from tests.ops.proxy import LosingProxy


@pytest.fixture
def api(ops_stack):
    with Client(ops_stack.base_url, ops_stack.api_key, timeout=10) as client:
        yield client


def test_submitted_task_is_read_listed_and_waited_for(api):
    task = api.submit("echo", {"message": "hi", "steps": 3}, metadata={"order": "42"})

    assert task["status"] == "pending" and task["agent"] == "echo"
    done = api.wait(task["id"], timeout=60)
    assert done["status"] == "completed"
    assert done["result"] == {"message": "hi", "steps": 3}
    assert api.get(task["id"])["metadata"] == {"order": "42"}
    assert task["id"] in [t["id"] for t in api.iter_tasks(agent="echo", page_size=1)]
    assert [s["index"] for s in api.steps(task["id"])] == [0, 1, 2]


def test_submission_whose_response_is_lost_is_retried_with_the_same_key(api, ops_stack):
    with LosingProxy(ops_stack.stack.web_port, lose=1) as proxy:
        with Client(proxy.url, ops_stack.api_key, timeout=10) as client:
            task = client.submit("echo", {"message": "lost once"})

    # The first attempt reached the web process and was answered 202; the caller never
    # saw that answer, retried with the same Idempotency-Key, and got the same task.
    assert len(proxy.lost_responses) == 1
    lost = proxy.lost_responses[0]
    assert lost.startswith(b"HTTP/1.1 202")
    lost_task = json.loads(lost.partition(b"\r\n\r\n")[2])
    assert task["id"] == lost_task["id"]
    assert proxy.connections == 2
    assert (
        ops_stack.count(
            "SELECT count(*) FROM tasks WHERE tenant_id = :t AND input->>'message' = 'lost once'",
            t=ops_stack.tenant_id,
        )
        == 1
    )


def test_unavailable_answer_is_retried_no_sooner_than_retry_after(ops_stack):
    with LosingProxy(ops_stack.stack.web_port, reject=1) as proxy:
        with Client(proxy.url, ops_stack.api_key, timeout=10) as client:
            started = time.monotonic()
            task = client.submit("echo", {"message": "busy once"})
            elapsed = time.monotonic() - started

    assert proxy.rejected == 1
    assert task["status"] == "pending"
    assert elapsed >= 1.0  # the 503 said Retry-After: 1


def test_unreachable_server_raises_network_error_after_retries(ops_stack):
    from app.dev.embedded import free_port

    client = Client(f"http://127.0.0.1:{free_port()}", ops_stack.api_key, max_retries=1)
    with pytest.raises(NetworkError):
        client.get("tsk_nothing")


def test_events_are_read_page_by_page_and_streamed_until_the_end(api):
    task = api.submit("echo", {"message": "ev", "steps": 3, "step_seconds": 0.2})

    streamed = list(api.events(task["id"], follow=True))
    paged = list(api.events(task["id"], page_size=2))

    assert [e["seq"] for e in streamed] == list(range(1, len(streamed) + 1))
    assert streamed[0]["type"] == "task.created"
    assert streamed[-1]["type"] == "task.completed"
    assert [e["type"] for e in streamed].count("task.progress") == 3
    assert [e["id"] for e in paged] == [e["id"] for e in streamed]
    assert [e["seq"] for e in api.events(task["id"], after=len(paged) - 1)] == [len(paged)]


def test_waiting_for_input_then_answering_completes_the_task(api):
    task = api.submit("approval", {"question": "ship it?"})

    waiting = api.wait(task["id"], timeout=30)
    assert waiting["status"] == "input_required"
    assert waiting["input_request"]["prompt"] == "ship it?"
    with pytest.raises(ValidationError) as invalid:
        api.send_input(task["id"], {"approved": "yes"})
    assert invalid.value.errors
    api.send_input(task["id"], {"approved": True, "comment": "go"})
    done = api.wait(task["id"], timeout=30)

    assert done["status"] == "completed"
    assert done["result"]["approved"] is True
    with pytest.raises(TaskNotWaiting):
        api.send_input(task["id"], {"approved": False})
    with pytest.raises(TaskTerminal):
        api.cancel(task["id"])


def test_cancelling_a_running_task_and_timing_out_a_wait(api):
    task = api.submit("echo", {"message": "long", "steps": 1, "step_seconds": 30})

    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        api.wait(task["id"], timeout=1.5)
    assert 1.4 <= time.monotonic() - started < 5
    assert timed_out.value.task["status"] in ("pending", "working")
    cancelled = api.cancel(task["id"])
    assert cancelled["status"] == "cancelled"
    assert api.cancel(task["id"])["status"] == "cancelled"  # again: still fine
    assert api.wait(task["id"], timeout=5)["status"] == "cancelled"


def test_problems_raise_the_exception_named_by_their_code(api, ops_stack):
    with pytest.raises(NotFound) as missing:
        api.get("tsk_does_not_exist")
    assert missing.value.status == 404 and missing.value.code == "not_found"
    assert missing.value.request_id
    with pytest.raises(ValidationError) as unknown_agent:
        api.submit("no-such-agent", {})
    assert "agent" in unknown_agent.value.errors
    with pytest.raises(ValidationError) as bad_input:
        api.submit("echo", {"steps": 2})
    assert "input.message" in bad_input.value.errors
    api.submit("echo", {"message": "a"}, idempotency_key="fixed-key-1")
    with pytest.raises(IdempotencyKeyReused):
        api.submit("echo", {"message": "b"}, idempotency_key="fixed-key-1")
    with pytest.raises(Unauthorized):
        Client(ops_stack.base_url, "olk_wrong").get("tsk_x")


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_deliveries_verify_with_the_tenants_secret(api, ops_stack):
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        task = api.submit("echo", {"message": "hooked"}, webhook_url=url)
        api.wait(task["id"], timeout=30)
        deadline = time.monotonic() + 20
        while not _Receiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
        server.server_close()

    assert _Receiver.received, "no webhook arrived"
    headers, body = _Receiver.received[0]
    event = verify_webhook(ops_stack.webhook_secret, headers, body)
    assert event["type"] == "task.completed" and event["task_id"] == task["id"]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(ops_stack.webhook_secret, headers, body.replace(b"hooked", b"forged"))


# --- synchronous answers, acknowledgement, deletion (V2.md sections 3 and 4) -------------------


def test_submit_with_wait_returns_the_finished_task(api):
    started = time.monotonic()
    task = api.submit("echo", {"message": "sync"}, wait=10)

    assert task["status"] == "completed"
    assert task["result"] == {"message": "sync", "steps": 1}
    assert time.monotonic() - started < 10


def test_submit_with_wait_returns_a_slow_task_as_it_is_after_the_wait(api):
    started = time.monotonic()
    task = api.submit("echo", {"message": "slow", "step_seconds": 30}, wait=1)
    took = time.monotonic() - started

    assert task["status"] in ("pending", "working")
    assert 0.9 <= took < 4, took
    api.cancel(task["id"])
    with pytest.raises(ValueError):
        api.submit("echo", {"message": "x"}, wait=61)


def test_a_result_is_listed_until_acknowledged_and_gone_once_deleted(api):
    task = api.submit("echo", {"message": "keep me"}, wait=10)
    assert task["status"] == "completed" and task["acknowledged_at"] is None
    unread = [t["id"] for t in api.iter_tasks(acknowledged=False, agent="echo")]
    assert task["id"] in unread

    acked = api.ack(task["id"])
    assert acked["acknowledged_at"] is not None
    assert api.ack(task["id"])["acknowledged_at"] == acked["acknowledged_at"]
    assert task["id"] not in [t["id"] for t in api.iter_tasks(acknowledged=False)]
    assert task["id"] in [t["id"] for t in api.list(acknowledged=True)["data"]]

    api.delete(task["id"])
    with pytest.raises(NotFound):
        api.get(task["id"])
    with pytest.raises(NotFound):
        api.delete(task["id"])


def test_a_running_task_cannot_be_acknowledged_or_deleted(api):
    task = api.submit("echo", {"message": "busy", "step_seconds": 30})
    try:
        with pytest.raises(TaskNotTerminal) as not_acked:
            api.ack(task["id"])
        assert not_acked.value.status == 409 and not_acked.value.code == "task_not_terminal"
        with pytest.raises(TaskNotTerminal):
            api.delete(task["id"])
        assert api.get(task["id"])["acknowledged_at"] is None
    finally:
        api.cancel(task["id"])


def test_a_delete_whose_answer_is_lost_is_retried_and_succeeds(api, ops_stack):
    task = api.submit("echo", {"message": "lose the 204"}, wait=10)
    with LosingProxy(ops_stack.stack.web_port, lose=1) as proxy:
        with Client(proxy.url, ops_stack.api_key, timeout=10) as client:
            client.delete(task["id"])  # the 204 is lost; the retry's 404 means done

    assert len(proxy.lost_responses) == 1 and proxy.lost_responses[0].startswith(b"HTTP/1.1 204")
    with pytest.raises(NotFound):
        api.get(task["id"])
