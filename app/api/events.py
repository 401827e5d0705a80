"""/v1/tasks/{id}/events: the task's event log as JSON pages, or as a Server-Sent Events
stream (``Accept: text/event-stream``) that resumes after ``Last-Event-ID`` and closes
after the terminal event, or after ``OUTLAST_SSE_MAX_SECONDS`` with a comment line.

Pages and stream batches are bounded: at most 1,000 events and 4 MiB (V2.md 8)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy.engine import Connection

from app import settings as settings_mod
from app.api import limits, queries, schemas
from app.api.auth import current_tenant
from app.api.longpoll import notifications
from app.api.tasks import load_task, read_task
from app.errors import ValidationFailed
from app.store import db
from app.store.lifecycle import TERMINAL
from app.store.representation import event_json

log = logging.getLogger(__name__)

blueprint = Blueprint("events", __name__, description="Task event logs (JSON pages and SSE).")

TERMINAL_EVENT_TYPES = frozenset({"task.completed", "task.failed", "task.cancelled"})
EVENT_STREAM = "text/event-stream"
# A comment line this often keeps proxies from cutting an idle stream and lets the
# server notice a client that went away.
KEEPALIVE_SECONDS = 15.0
# V2.md 8: an event page (and an SSE batch) is at most this many events and bytes.
MAX_PAGE_EVENTS = 1000
MAX_PAGE_BYTES = 4 * 1024 * 1024


def wants_event_stream() -> bool:
    """``Accept`` prefers ``text/event-stream`` to JSON (``*/*`` alone means JSON)."""
    accept = request.accept_mimetypes
    stream_quality = max((q for value, q in accept if value.lower() == EVENT_STREAM), default=0)
    return stream_quality > 0 and stream_quality >= accept["application/json"]


def last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= 2**31 - 1:
        raise ValidationFailed(
            {"Last-Event-ID": ["Must be the seq of an event (an integer >= 0)."]}
        )
    return value


@blueprint.route("/tasks/<task_id>/events")
class TaskEvents(MethodView):
    @blueprint.arguments(schemas.ListEventsQuery, location="query")
    @blueprint.response(
        200,
        schemas.EventPageSchema,
        description="Events oldest first; with Accept: text/event-stream, an SSE stream "
        "(event: type, id: seq, data: the event JSON) that closes after the terminal event.",
    )
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.doc(
        parameters=[
            {
                "in": "header",
                "name": "Last-Event-ID",
                "required": False,
                "description": "SSE only: resume after this seq (takes precedence over after).",
                "schema": {"type": "string"},
            }
        ],
        responses={
            200: {
                "content": {
                    EVENT_STREAM: {
                        "schema": {"type": "string", "description": "Server-Sent Events"}
                    }
                }
            }
        },
    )
    def get(self, query: dict[str, Any], task_id: str) -> Response:
        """A task's events (the replay endpoint), or their live stream."""
        if wants_event_stream():
            resume = last_event_id()
            after = resume if resume is not None else query["after"]
            read_task(task_id)
            # Taken before the answer starts: past the tenant's cap the answer is a 429.
            slot = limits.acquire_waiter(current_tenant())
            response = Response(
                _stream(task_id, after, slot, settings_mod.current().sse_max_seconds),
                mimetype=EVENT_STREAM,
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            response.call_on_close(slot.release)  # also when the stream never started
            return response
        with db.engine().connect() as conn:
            load_task(conn, task_id)
            page = read_page(conn, task_id, query["after"], query["limit"])
        cursor = json.dumps(str(page.last_seq)) if page.more else "null"
        # Each event was encoded once, while the page's size was counted.
        body = '{"data": [' + ", ".join(page.encoded) + '], "next_cursor": ' + cursor + "}"
        return Response(body, mimetype="application/json")


@dataclass
class EventPage:
    """Events after a seq, each already encoded as JSON, within the page bounds."""

    events: list[dict[str, Any]] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)
    more: bool = False  # events after the last one exist (or may: the page was full)

    @property
    def last_seq(self) -> int | None:
        return self.events[-1]["seq"] if self.events else None


def read_page(conn: Connection, task_id: str, after: int, limit: int) -> EventPage:
    """At most ``limit`` (<= :data:`MAX_PAGE_EVENTS`) events with ``seq > after``, and at
    most :data:`MAX_PAGE_BYTES` of their JSON (one event larger than that still makes a
    page of its own). Rows are streamed from a server-side cursor, so a page's memory is
    bounded by the page, not by ``limit`` times the largest event."""
    limit = min(limit, MAX_PAGE_EVENTS)
    page = EventPage()
    size = 0
    result = conn.execution_options(stream_results=True, max_row_buffer=50).execute(
        queries.EVENTS_AFTER, {"task_id": task_id, "after": after, "limit": limit + 1}
    )
    try:
        for row in result.mappings():
            if len(page.events) >= limit:
                page.more = True
                break
            event = event_json(row)
            text = json.dumps(event)
            if page.events and size + len(text) + 2 > MAX_PAGE_BYTES:
                page.more = True
                break
            page.events.append(event)
            page.encoded.append(text)
            size += len(text) + 2
    finally:
        result.close()
    return page


def sse_block(event: dict[str, Any], encoded: str | None = None) -> str:
    """One SSE message: ``event:`` type, ``id:`` seq, ``data:`` the event JSON."""
    data = encoded if encoded is not None else json.dumps(event)
    return f"event: {event['type']}\nid: {event['seq']}\ndata: {data}\n\n"


# The last thing a stream sends when OUTLAST_SSE_MAX_SECONDS ends it (V2.md 8).
END_OF_STREAM_COMMENT = (
    ": stream closed after OUTLAST_SSE_MAX_SECONDS; reconnect with Last-Event-ID\n\n"
)


def _stream(task_id: str, after: int, slot: limits.WaiterSlot, max_seconds: float) -> Iterator[str]:
    """Events after ``after`` as they are committed; ends after the terminal event, or
    after ``max_seconds`` with :data:`END_OF_STREAM_COMMENT` (the client resumes).

    Between batches it waits on the process's LISTEN connection and holds no database
    connection of its own; it holds its tenant's waiter ``slot`` until it ends.
    """
    last = after
    ends_at = time.monotonic() + max_seconds
    quiet_since = time.monotonic()
    try:
        with notifications.watch(task_id) as waiter:
            changed = True  # read at once: the watch is registered, nothing can be missed
            while True:
                if changed:
                    with db.engine().connect() as conn:
                        page = read_page(conn, task_id, last, MAX_PAGE_EVENTS)
                        status = None
                        if not page.events:
                            status = conn.execute(queries.TASK_STATUS, {"id": task_id}).scalar()
                            if status in TERMINAL:
                                # The terminal commit may have landed between the two
                                # reads: its events came with it, so read once more.
                                page = read_page(conn, task_id, last, MAX_PAGE_EVENTS)
                    for event, encoded in zip(page.events, page.encoded, strict=True):
                        yield sse_block(event, encoded)
                        quiet_since = time.monotonic()
                        last = event["seq"]
                        if event["type"] in TERMINAL_EVENT_TYPES:
                            return
                    if not page.events and (status is None or status in TERMINAL):
                        return  # purged, or resumed after its terminal event: nothing will come
                if time.monotonic() >= ends_at:
                    yield END_OF_STREAM_COMMENT
                    return
                if changed and page.events:
                    continue  # a full batch: there may be more
                now = time.monotonic()
                woken = waiter.wait(min(KEEPALIVE_SECONDS - (now - quiet_since), ends_at - now))
                # A quiet wake-up (keep-alive, deadline) reads nothing: 1,000 idle streams
                # cost no queries. Without the listener, poll.
                changed = woken or not notifications.connected
                slot.renew()
                if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
    except GeneratorExit:
        raise
    except Exception:  # database gone mid-stream: end it; the client resumes by Last-Event-ID
        log.warning("event stream for %s ended by an error", task_id, exc_info=True)
    finally:
        slot.release()
