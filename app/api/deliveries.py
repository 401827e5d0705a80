"""/v1 webhook endpoints: a task's deliveries, replaying them, rotating the secret.

Views build their JSON with :mod:`app.webhooks.deliveries`; the schemas below describe it for the
OpenAPI document and validate the replay request.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app.api.auth import current_tenant
from app.errors import NotFound
from app.store import db, lifecycle
from app.webhooks import deliveries, secrets

blueprint = Blueprint(
    "deliveries",
    __name__,
    description="Webhook deliveries of a task, replaying them, and the signing secret.",
)

# Our ids are short and plain; anything else cannot exist (answered 404 without a query).
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --- schemas --------------------------------------------------------------------------------


class DeliverySchema(Schema):
    id = fields.String(required=True, metadata={"example": "dlv_..."})
    event_id = fields.String(required=True, metadata={"description": "Also the webhook-id."})
    event_type = fields.String(
        required=True, validate=validate.OneOf(sorted(lifecycle.WEBHOOK_EVENT_TYPES))
    )
    url = fields.String(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(["pending", "delivered", "failed"])
    )
    attempts = fields.Integer(required=True)
    last_status_code = fields.Integer(required=True, allow_none=True)
    last_error = fields.String(required=True, allow_none=True)
    next_attempt_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={"description": "When the next attempt is due; null once delivered or failed."},
    )
    delivered_at = fields.DateTime(required=True, allow_none=True)


class DeliveryListSchema(Schema):
    data = fields.List(fields.Nested(DeliverySchema), required=True)


class ReplayRequest(Schema):
    after = fields.Integer(
        strict=True,
        load_default=0,
        validate=validate.Range(min=0),
        metadata={"description": "Replay only events with a greater seq (default: all)."},
    )


class WebhookSecretSchema(Schema):
    webhook_secret = fields.String(required=True, metadata={"example": "whsec_..."})


# --- helpers ---------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _load_task(conn: Any, task_id: str) -> Any:
    """The authenticated tenant's task, else 404 (another tenant's task included)."""
    row = lifecycle.get(conn, task_id, current_tenant()) if TASK_ID.match(task_id) else None
    if row is None:
        raise NotFound("No task with this id.")
    return row


# --- views -------------------------------------------------------------------------------------


@blueprint.route("/tasks/<task_id>/deliveries")
class TaskDeliveries(MethodView):
    @blueprint.response(200, DeliveryListSchema)
    @blueprint.alt_response(404, response="NOT_FOUND")
    def get(self, task_id: str) -> Response:
        """List a task's webhook deliveries, oldest first (replays included)."""
        with db.engine().connect() as conn:
            task = _load_task(conn, task_id)
            data = deliveries.list_for_task(conn, task["id"], task["tenant_id"])
        return _json({"data": data})


@blueprint.route("/tasks/<task_id>/deliveries/replay")
class TaskDeliveriesReplay(MethodView):
    # The optional body went through the shared JSON checks already
    # (app.api.jsonbody.check_any_body, a before_request hook of every /v1 blueprint).
    @blueprint.arguments(ReplayRequest, required=False)
    @blueprint.response(202, DeliveryListSchema, description="The deliveries created.")
    @blueprint.alt_response(400, response="BAD_REQUEST")
    @blueprint.alt_response(404, response="NOT_FOUND")
    @blueprint.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
    def post(self, body: dict[str, Any], task_id: str) -> Response:
        """Queue a fresh delivery of the task's webhook events with seq > after.

        Each keeps its event's id as webhook-id, so receivers deduplicate replays; every
        attempt gets a new timestamp and signature. A task without a webhook_url has
        nothing to replay (an empty list).
        """
        with db.transaction() as conn:
            task = _load_task(conn, task_id)
            created = deliveries.replay(conn, task, after=body.get("after", 0))
        return _json({"data": created}, 202)


@blueprint.route("/webhook-secret/rotate")
class WebhookSecretRotate(MethodView):
    @blueprint.response(200, WebhookSecretSchema)
    def post(self) -> Response:
        """Rotate the tenant's webhook signing secret.

        The new secret signs from now on; the previous one keeps signing alongside it
        (a second v1 signature) for 24 hours, so receivers can switch without a gap.
        """
        with db.transaction() as conn:
            secret = secrets.rotate_secret(conn, current_tenant())
        response = _json({"webhook_secret": secret})
        response.headers["Cache-Control"] = "no-store"  # a secret must not be cached
        return response
