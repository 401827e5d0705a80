"""``GET /v1/tasks/{id}/children``: a task's child tasks (V2.md section 6), in the order
they were spawned, paged like ``GET /v1/tasks``."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import RAISE

from app.api import schemas
from app.api.tasks import decode_cursor, encode_cursor, json_response, load_task
from app.store import children, db
from app.store.representation import task_json

blueprint = Blueprint("children", __name__, description="A task's child tasks.")


@blueprint.route("/tasks/<task_id>/children")
class TaskChildren(MethodView):
    @blueprint.arguments(schemas.ListChildrenQuery, location="query", unknown=RAISE)
    @blueprint.response(200, schemas.TaskPageSchema)
    @blueprint.alt_response(404, response="NOT_FOUND")
    def get(self, query: dict[str, Any], task_id: str) -> Response:
        """List a task's children (the tasks its steps spawned), oldest first.

        In the order they were spawned; pass next_cursor back as cursor for the next
        page. Another tenant's task is a 404, like an unknown id.
        """
        with db.engine().connect() as conn:
            load_task(conn, task_id)
            rows = children.page(
                conn,
                task_id,
                limit=query["limit"] + 1,
                after=decode_cursor(query["cursor"]) if "cursor" in query else None,
            )
        page = rows[: query["limit"]]
        more = len(rows) > query["limit"]
        return json_response(
            {
                "data": [task_json(row) for row in page],
                "next_cursor": encode_cursor(page[-1]) if more else None,
            }
        )
