"""/v1/usage: what the tenant's tasks spent (model calls, tool calls, tokens), by agent
and day.

Each task's ``usage`` counts every completed call once (never a replay); this endpoint
adds them up over the tasks the tenant created between ``from`` and ``to`` (UTC days,
both included), a task counting on the day it was created.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app.api.auth import current_tenant
from app.api.schemas import MAX_AGENT_NAME_LENGTH
from app.api.tasks import json_response
from app.store import db

blueprint = Blueprint("usage", __name__, description="What the tenant's tasks spent.")

DEFAULT_DAYS = 30
MAX_DAYS = 366
COUNTERS = ("model_calls", "tool_calls", "input_tokens", "output_tokens")

USAGE_BY_DAY_AND_AGENT = sa.text(
    "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, agent, count(*) AS tasks, "
    + ", ".join(f"COALESCE(sum((usage->>'{k}')::bigint), 0) AS {k}" for k in COUNTERS)
    + " FROM tasks WHERE tenant_id = :tenant_id AND created_at >= :start "
    "AND created_at < :end AND (CAST(:agent AS text) IS NULL OR agent = :agent) "
    "GROUP BY 1, 2 ORDER BY 1, 2"
)


class UsageQuery(Schema):
    from_ = fields.Date(
        data_key="from",
        metadata={
            "description": f"First UTC day (YYYY-MM-DD); default: {DEFAULT_DAYS - 1} "
            "days before to."
        },
    )
    to = fields.Date(metadata={"description": "Last UTC day, included; default: today."})
    agent = fields.String(
        validate=validate.Length(min=1, max=MAX_AGENT_NAME_LENGTH),
        metadata={"description": "Only this agent's tasks."},
    )

    @validates_schema
    def _range(self, data: dict[str, Any], **_: Any) -> None:
        end = data.get("to") or datetime.now(UTC).date()
        start = data.get("from_") or end - timedelta(days=DEFAULT_DAYS - 1)
        if start > end:
            raise ValidationError("Must not be after to.", "from")
        if (end - start).days + 1 > MAX_DAYS:
            raise ValidationError(f"The range may span at most {MAX_DAYS} days.", "from")


class UsageCountsSchema(Schema):
    tasks = fields.Integer(required=True, metadata={"description": "Tasks created."})
    model_calls = fields.Integer(required=True)
    tool_calls = fields.Integer(required=True)
    input_tokens = fields.Integer(required=True)
    output_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class UsageRowSchema(UsageCountsSchema):
    day = fields.Date(required=True, metadata={"description": "UTC day the tasks were created."})
    agent = fields.String(required=True)


class UsageReportSchema(Schema):
    """The answer of ``GET /v1/usage``."""

    object = fields.String(required=True, validate=validate.OneOf(["usage"]))
    from_ = fields.Date(required=True, data_key="from")
    to = fields.Date(required=True)
    agent = fields.String(required=True, allow_none=True)
    totals = fields.Nested(UsageCountsSchema, required=True)
    data = fields.List(
        fields.Nested(UsageRowSchema),
        required=True,
        metadata={"description": "One row per day and agent with tasks, oldest day first."},
    )


def _counts(row: Any) -> dict[str, int]:
    counts = {"tasks": int(row["tasks"]), **{k: int(row[k]) for k in COUNTERS}}
    counts["total_tokens"] = counts["input_tokens"] + counts["output_tokens"]
    return counts


@blueprint.route("/usage")
class Usage(MethodView):
    @blueprint.arguments(UsageQuery, location="query")
    @blueprint.response(200, UsageReportSchema)
    def get(self, query: dict[str, Any]) -> Response:
        """The tenant's usage: totals and one row per day and agent.

        Tasks count on the UTC day they were created; each task's usage counts every
        completed model and tool call once (a call replayed after a crash is not counted
        again).
        """
        end: date = query.get("to") or datetime.now(UTC).date()
        start: date = query.get("from_") or end - timedelta(days=DEFAULT_DAYS - 1)
        with db.engine().connect() as conn:
            rows = list(
                conn.execute(
                    USAGE_BY_DAY_AND_AGENT,
                    {
                        "tenant_id": current_tenant(),
                        "start": datetime.combine(start, datetime.min.time(), UTC),
                        "end": datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC),
                        "agent": query.get("agent"),
                    },
                ).mappings()
            )
        data = [{"day": r["day"].isoformat(), "agent": r["agent"], **_counts(r)} for r in rows]
        totals = {k: sum(r[k] for r in data) for k in ("tasks", *COUNTERS, "total_tokens")}
        return json_response(
            {
                "object": "usage",
                "from": start.isoformat(),
                "to": end.isoformat(),
                "agent": query.get("agent"),
                "totals": totals,
                "data": data,
            }
        )
