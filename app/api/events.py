"""/v1/tasks/{id}/events: the task's event log as JSON pages, or as a Server-Sent Events
stream (``Accept: text/event-stream``) that resumes after ``Last-Event-ID`` and closes
after the terminal event."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api import queries, schemas
from app.api.longpoll import notifications
from app.api.tasks import json_response, load_task
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
STREAM_BATCH = 500


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
        with db.engine().connect() as conn:
            load_task(conn, task_id)
            if not wants_event_stream():
                rows = (
                    conn.execute(
                        queries.EVENTS_AFTER,
                        {"task_id": task_id, "after": query["after"], "limit": query["limit"] + 1},
                    )
                    .mappings()
                    .all()
                )
        if wants_event_stream():
            resume = last_event_id()
            after = resume if resume is not None else query["after"]
            return Response(
                _stream(task_id, after),
                mimetype=EVENT_STREAM,
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        page = rows[: query["limit"]]
        more = len(rows) > query["limit"]
        return json_response(
            {
                "data": [event_json(row) for row in page],
                "next_cursor": str(page[-1]["seq"]) if more else None,
            }
        )


def sse_block(event: dict[str, Any]) -> str:
    """One SSE message: ``event:`` type, ``id:`` seq, ``data:`` the event JSON."""
    return f"event: {event['type']}\nid: {event['seq']}\ndata: {json.dumps(event)}\n\n"


def _stream(task_id: str, after: int) -> Iterator[str]:
    """Events after ``after`` as they are committed; ends after the terminal event.

    Between batches it waits on the process's LISTEN connection and holds no database
    connection of its own.
    """
    last = after
    quiet_since = time.monotonic()
    try:
        with notifications.watch(task_id) as waiter:
            while True:
                with db.engine().connect() as conn:
                    rows = (
                        conn.execute(
                            queries.EVENTS_AFTER,
                            {"task_id": task_id, "after": last, "limit": STREAM_BATCH},
                        )
                        .mappings()
                        .all()
                    )
                    status = None
                    if not rows:
                        status = conn.execute(
                            queries.TASK_STATUS,
                            {"id": task_id},
                        ).scalar()
                for row in rows:
                    event = event_json(row)
                    yield sse_block(event)
                    quiet_since = time.monotonic()
                    last = event["seq"]
                    if event["type"] in TERMINAL_EVENT_TYPES:
                        return
                if rows:
                    continue
                if status is None or status in TERMINAL:
                    return  # purged, or resumed after its terminal event: nothing will come
                waiter.wait(KEEPALIVE_SECONDS - (time.monotonic() - quiet_since))
                if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
    except GeneratorExit:
        raise
    except Exception:  # database gone mid-stream: end it; the client resumes by Last-Event-ID
        log.warning("event stream for %s ended by an error", task_id, exc_info=True)
