"""/v1/tasks: submit (with ``Prefer: wait=N``), read (with ETag and the ``?wait=N`` long
poll), list with cursors, the checkpoint log, cancel, human input, acknowledge, delete."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from flask import Response, g, request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE
from sqlalchemy.engine import Connection, RowMapping

from app.api import prefer, queries, schemas
from app.api.auth import current_tenant
from app.api.jsonbody import json_body
from app.api.longpoll import wait_for
from app.errors import NotFound, RateLimited, TaskNotWaiting, TaskTerminal, ValidationFailed
from app.ops import metrics
from app.store import db, lifecycle, outbox, retention, submission, tool_calls
from app.store.representation import rfc3339, task_json
from app.validation import schema_errors

blueprint = Blueprint("tasks", __name__, description="Submit, read, list, cancel and answer tasks.")

# Ids are ours (``tsk_`` + base32); anything else cannot exist and is answered 404
# without a query (which also keeps NUL bytes and megabyte ids away from the database).
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Suggested poll intervals (Retry-After) while a task is not terminal.
RETRY_AFTER_SECONDS = {
    lifecycle.Status.PENDING: 1,
    lifecycle.Status.WORKING: 2,
    lifecycle.Status.INPUT_REQUIRED: 5,
    lifecycle.Status.COMPENSATING: 2,
}

# A task in one of these needs its client before anything more happens: a ``Prefer:
# wait`` submission answers as soon as its task reaches one.
SETTLED = lifecycle.TERMINAL | {lifecycle.Status.INPUT_REQUIRED}

TASK_HEADERS = {
    "ETag": {
        "description": "Tag of this representation, for If-None-Match.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Suggested poll interval in seconds; only while the task is not terminal.",
        "schema": {"type": "integer"},
    },
}


PREFERENCE_APPLIED_HEADER = {
    "description": "wait=N when the request's Prefer: wait=N was honoured.",
    "schema": {"type": "string", "example": "wait=10"},
}


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer (views build their own bodies with :mod:`app.store.representation`)."""
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def task_etag(body: Mapping[str, Any]) -> str:
    """A strong tag of the task's JSON: it changes whenever any field does."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
    return f'"{digest}"'


def task_response(row: Mapping[str, Any], status: int = 200, **headers: str) -> Response:
    """The task with ``ETag`` and, while it is not terminal, ``Retry-After``."""
    body = task_json(row)
    response = json_response(body, status)
    response.headers["ETag"] = task_etag(body)
    retry_after = RETRY_AFTER_SECONDS.get(lifecycle.Status(row["status"]))
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def load_task(conn: Connection, task_id: str) -> RowMapping:
    """The authenticated tenant's task, else ``404`` (another tenant's task included)."""
    if not TASK_ID.match(task_id):
        raise NotFound("No task with this id.")
    row = lifecycle.get(conn, task_id, current_tenant())
    if row is None:
        raise NotFound("No task with this id.")
    return row


def read_task(task_id: str) -> RowMapping:
    """:func:`load_task` on a connection held only for the query."""
    with db.engine().connect() as conn:
        return load_task(conn, task_id)


# --- cursors -----------------------------------------------------------------------------


def encode_cursor(row: Mapping[str, Any]) -> str:
    """Opaque position after ``row`` in newest-first order: its (created_at, id)."""
    raw = json.dumps([row["created_at"].isoformat(), row["id"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = json.loads(raw)
        position = (datetime.fromisoformat(created_at), str(task_id))
        if position[0].tzinfo is None or not TASK_ID.match(position[1]):
            raise ValueError("bad cursor")
        return position
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed({"cursor": ["Not a valid cursor."]}) from None


# --- views -------------------------------------------------------------------------------


@blueprint.route("/tasks")
class TaskCollection(MethodView):
    @json_body
    @blueprint.arguments(schemas.CreateTaskRequest)
    @blueprint.response(
        202,
        schemas.TaskSchema,
        description="Accepted (or replayed, with Idempotent-Replayed: true).",
        headers={
            "Location": {"description": "/v1/tasks/{id}", "schema": {"type": "string"}},
            "Idempotent-Replayed": {
                "description": "true when this answer replays an earlier request's task.",
                "schema": {"type": "string", "enum": ["true"]},
            },
            **TASK_HEADERS,
            "Preference-Applied": PREFERENCE_APPLIED_HEADER,
        },
    )
    @blueprint.alt_response(
        200,
        schema=schemas.TaskSchema,
        description="With Prefer: wait=N, the task finished or asks for input within N "
        "seconds: the task as it is then.",
        headers={"Preference-Applied": PREFERENCE_APPLIED_HEADER, **TASK_HEADERS},
        success=True,
    )
    @blueprint.alt_response(400, response="BAD_REQUEST")
    @blueprint.alt_response(409, response="CONFLICT")
    @blueprint.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
    @blueprint.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    @blueprint.alt_response(503, response="SERVICE_UNAVAILABLE")
    @blueprint.doc(
        parameters=[
            {
                "in": "header",
                "name": "Idempotency-Key",
                "required": False,
                "description": "1 to 255 printable ASCII characters; scoped to the tenant.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            },
            {
                "in": "header",
                "name": "Prefer",
                "required": False,
                "description": "RFC 7240. wait=N (N from 1 to 60): answer 200 with the task "
                "as soon as it is terminal or input_required, or 202 after N seconds; "
                "honoured on an idempotent replay too. Other preferences, and wait out of "
                "range, are ignored.",
                "schema": {"type": "string", "example": "wait=10"},
            },
        ]
    )
    def post(self, task: dict[str, Any]) -> Response:
        """Submit a task.

        The task is stored, with its task.created event and the message that runs its
        first step, in one transaction before the answer is sent. With Prefer: wait=N
        the answer waits up to N seconds for the task to finish or ask for input.
        """
        started = time.monotonic()
        wait = prefer.wait_seconds(request.headers.getlist("Prefer"))
        key = submission.check_idempotency_key(request.headers.get("Idempotency-Key"))
        result = submission.submit(current_tenant(), task, body=g.json_body, idempotency_key=key)
        headers = {"Location": f"/v1/tasks/{result.task['id']}"}
        if result.replayed:
            headers["Idempotent-Replayed"] = "true"
        if wait is None:
            return task_response(result.task, 202, **headers)
        row = result.task
        if row["status"] not in SETTLED:
            try:
                row = wait_for(
                    row["id"],
                    current_tenant(),
                    lambda: read_task(result.task["id"]),
                    lambda r: r["status"] in SETTLED,
                    started + wait - time.monotonic(),
                )
            except RateLimited:
                # Every waiter slot of the tenant is taken: the task stands, the
                # preference is ignored (RFC 7240 lets a server do that).
                return task_response(result.task, 202, **headers)
        headers["Preference-Applied"] = prefer.applied_wait(wait)
        return task_response(row, 200 if row["status"] in SETTLED else 202, **headers)

    # A misspelt filter is refused, not ignored: ?acknowleged=false must not list every
    # task to a client about to acknowledge what it lists.
    @blueprint.arguments(schemas.ListTasksQuery, location="query", unknown=RAISE)
    @blueprint.response(200, schemas.TaskPageSchema)
    def get(self, query: dict[str, Any]) -> Response:
        """List tasks, newest first.

        Cursor paging is stable while new tasks arrive: pass next_cursor back as cursor.
        acknowledged=false lists the finished results not yet acknowledged.
        """
        with db.engine().connect() as conn:
            rows = queries.list_tasks(
                conn,
                current_tenant(),
                limit=query["limit"] + 1,
                status=query.get("status"),
                agent=query.get("agent"),
                acknowledged=query.get("acknowledged"),
                before=decode_cursor(query["cursor"]) if "cursor" in query else None,
            )
        page = rows[: query["limit"]]
        more = len(rows) > query["limit"]
        return json_response(
            {
                "data": [task_json(row) for row in page],
                "next_cursor": encode_cursor(page[-1]) if more else None,
            }
        )


def _etag_matches(etag: str) -> bool:
    return request.if_none_match.contains_weak(etag.strip('"'))


@blueprint.route("/tasks/<task_id>")
class TaskItem(MethodView):
    @blueprint.arguments(schemas.GetTaskQuery, location="query")
    @blueprint.response(200, schemas.TaskSchema, headers=TASK_HEADERS)
    @blueprint.alt_response(304, description="Not modified (If-None-Match matched the ETag).")
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.doc(
        parameters=[
            {
                "in": "header",
                "name": "If-None-Match",
                "required": False,
                "description": "An ETag from an earlier answer; 304 while it is current.",
                "schema": {"type": "string"},
            }
        ]
    )
    def get(self, query: dict[str, Any], task_id: str) -> Response:
        """Read a task; `?wait=N` long-polls for a change of status or step."""
        row = read_task(task_id)
        wait = query.get("wait") or 0
        if wait > 0 and row["status"] not in lifecycle.TERMINAL:
            row = _wait_for_change(task_id, row, wait)
        response = task_response(row)
        if request.if_none_match and _etag_matches(response.headers["ETag"]):
            not_modified = Response(status=304)
            for name in ("ETag", "Retry-After"):
                if name in response.headers:
                    not_modified.headers[name] = response.headers[name]
            return not_modified
        return response

    @blueprint.response(204, description="Deleted, with everything recorded about it.")
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.alt_response(409, response="CONFLICT", description="task_not_terminal")
    def delete(self, task_id: str) -> Response:
        """Delete a finished task at once, with everything recorded about it.

        Its events, checkpoints, tool-call log, webhook deliveries (one that no sender
        has taken yet is never sent) and Idempotency-Key go in one transaction: then GET
        answers 404 and the old key creates a new task. A task not yet terminal is a 409
        task_not_terminal.
        """
        if not TASK_ID.match(task_id):
            raise NotFound("No task with this id.")
        retention.delete(task_id, current_tenant())
        metrics.tasks_deleted("request")
        return Response(status=204)


def _wait_for_change(task_id: str, row: RowMapping, wait: float) -> RowMapping:
    """Block (on LISTEN/NOTIFY, holding no connection) until the task's status or step
    differs from ``row``'s, it is terminal, or ``wait`` seconds passed.

    With ``If-None-Match`` naming an older representation, the change already happened:
    answer at once.
    """
    if request.if_none_match and not _etag_matches(task_etag(task_json(row))):
        return row
    initial = (row["status"], row["step"])
    return wait_for(
        task_id,
        current_tenant(),
        lambda: read_task(task_id),
        lambda r: r["status"] in lifecycle.TERMINAL or (r["status"], r["step"]) != initial,
        wait,
    )


@blueprint.route("/tasks/<task_id>/steps")
class TaskSteps(MethodView):
    @blueprint.response(200, schemas.StepListSchema)
    @blueprint.alt_response(404, response="NOT_FOUND")
    def get(self, task_id: str) -> Response:
        """The checkpoint log, oldest first, each step with its tool calls."""
        with db.engine().connect() as conn:
            load_task(conn, task_id)
            checkpoints = conn.execute(queries.CHECKPOINTS, {"task_id": task_id}).all()
            calls = tool_calls.for_task(conn, task_id)
        by_step: dict[int, list[dict[str, Any]]] = {}
        for call in calls:
            by_step.setdefault(call["step_index"], []).append(
                {
                    "index": call["call_index"],
                    "name": call["name"],
                    "idempotency_key": call["idempotency_key"],
                    "status": call["status"],
                    "kind": call["kind"],  # V2.md 5: "call" or "compensation" (an undo)
                }
            )
        steps = [
            {
                "index": cp.step_index,
                "status": "completed",
                "started_at": rfc3339(cp.started_at),
                "finished_at": rfc3339(cp.finished_at),
                "tool_calls": by_step.get(cp.step_index, []),
            }
            for cp in checkpoints
        ]
        return json_response({"data": steps})


@blueprint.route("/tasks/<task_id>/cancel")
class TaskCancel(MethodView):
    @blueprint.response(200, schemas.TaskSchema)
    @blueprint.alt_response(
        202,
        schema=schemas.TaskSchema,
        description="The task has completed calls to undo: it is compensating, and "
        "becomes cancelled once they are undone.",
    )
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.alt_response(409, response="CONFLICT", description="task_terminal")
    def post(self, task_id: str) -> Response:
        """Cancel a task: any non-terminal task becomes cancelled at once.

        A task with completed calls to undo answers 202 compensating instead; no call
        but the undos starts after it. Cancelling a cancelled or compensating task
        answers it as it is; a completed or failed one is a 409.
        """
        with db.transaction() as conn:
            if not TASK_ID.match(task_id):
                raise NotFound("No task with this id.")
            row = lifecycle.cancel(conn, task_id, current_tenant())
            if row is not None and row["status"] == lifecycle.Status.COMPENSATING:
                return task_response(row, 202)
            if row is None:
                row = load_task(conn, task_id)
                if row["status"] not in (
                    lifecycle.Status.CANCELLED,
                    lifecycle.Status.COMPENSATING,
                ):
                    raise TaskTerminal(f"The task is already {row['status']}.")
        return task_response(row)


@blueprint.route("/tasks/<task_id>/ack")
class TaskAck(MethodView):
    @blueprint.response(200, schemas.TaskSchema, headers={"ETag": TASK_HEADERS["ETag"]})
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.alt_response(409, response="CONFLICT", description="task_not_terminal")
    def post(self, task_id: str) -> Response:
        """Acknowledge a finished task's result: it gets acknowledged_at.

        Acknowledging again answers the same acknowledged_at. The task is purged
        OUTLAST_TASK_RETENTION_DAYS later; a task not yet terminal is a 409
        task_not_terminal.
        """
        if not TASK_ID.match(task_id):
            raise NotFound("No task with this id.")
        with db.transaction() as conn:
            row = retention.acknowledge(conn, task_id, current_tenant())
        return task_response(row)


@blueprint.route("/tasks/<task_id>/input")
class TaskInput(MethodView):
    @json_body
    @blueprint.arguments(schemas.SubmitInputRequest)
    @blueprint.response(202, schemas.TaskSchema)
    @blueprint.alt_response(400, response="BAD_REQUEST")
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.alt_response(409, response="CONFLICT", description="task_not_waiting")
    @blueprint.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
    @blueprint.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    def post(self, body: dict[str, Any], task_id: str) -> Response:
        """Answer a task waiting in input_required; it resumes at once."""
        with db.transaction() as conn:
            if not TASK_ID.match(task_id):
                raise NotFound("No task with this id.")
            # Locked so that the state checked is the state resumed.
            row = (
                conn.execute(queries.LOCK_TASK, {"id": task_id, "tenant_id": current_tenant()})
                .mappings()
                .one_or_none()
            )
            if row is None:
                raise NotFound("No task with this id.")
            if row["status"] != lifecycle.Status.INPUT_REQUIRED:
                raise TaskNotWaiting(f"The task is {row['status']}, not input_required.")
            errors = schema_errors((row["input_request"] or {}).get("schema"), body["input"])
            if errors:
                raise ValidationFailed(errors, "The input does not match input_request.schema.")
            resumed = lifecycle.resume_with_input(conn, task_id, current_tenant(), body["input"])
            if resumed is None:  # cannot happen under the row lock; keep the contract anyway
                raise TaskNotWaiting("The task is no longer waiting for input.")
            outbox.add_step(conn, task_id, resumed["step"])
        return task_response(resumed, 202)
