"""docs/agents.md's compensation example ("## Compensations"), run as written by a real
worker: a failed trip cancels its bookings, newest first, with ``<key>-undo``."""

from __future__ import annotations

import pytest

from tests.engine.doc_examples import register_example
from tests.engine.servers import LocalServer, json_answer


@pytest.fixture
def trip_agents(settings, tmp_path, monkeypatch):
    yield from register_example(settings, tmp_path, monkeypatch, "Compensations", "trip_agents")


def test_docs_compensation_example_cancels_both_bookings_newest_first(
    trip_agents, celery_worker, tasks
):
    # Given a booking service that books once per Idempotency-Key and cancels bookings
    bookings: dict[str, str] = {}
    cancelled: list[tuple[str, str | None]] = []

    def service(request):
        if request.method == "POST":
            booking = bookings.setdefault(request.key, f"bk-{len(bookings) + 1}")
            return json_answer(200, {"booking": booking})
        cancelled.append((request.path, request.key))
        return json_answer(200, {})

    server = LocalServer(service)
    try:
        # When a trip books two flights and then finds no hotel
        task_id = tasks.submit(
            "trip", {"url": server.url, "flights": ["LH100", "AF200"], "hotel": False}
        )
        task = tasks.wait_status(task_id, {"failed", "cancelled", "completed"}, timeout=30)
    finally:
        server.close()

    # Then both bookings are cancelled, newest first, each once with <key>-undo
    keys = {booking: key for key, booking in bookings.items()}
    assert cancelled == [
        ("/bookings/bk-2", keys["bk-2"] + "-undo"),
        ("/bookings/bk-1", keys["bk-1"] + "-undo"),
    ]
    assert task["status"] == "failed"
    assert task["error"] == {"type": "agent_error", "message": "no hotel room: the trip is off"}
    assert task["compensation"] == {"reason": "failed", "total": 2, "done": 2, "failed": 0}
    assert tasks.event_types(task_id)[-2:] == ["task.compensating", "task.failed"]
    outputs = tasks.rows(
        "SELECT output FROM tool_calls WHERE task_id = :id AND kind = 'compensation' "
        "ORDER BY step_index",
        id=task_id,
    )
    assert [r["output"] for r in outputs] == [{"cancelled": "bk-1"}, {"cancelled": "bk-2"}]
