"""``calls``: one idempotent HTTP POST per step, keyed by the tool call's key."""

from __future__ import annotations

from typing import Any

from app.agents.builtin.schemas import HTTP_URL
from app.engine.context import StepContext
from outlast.sdk import Outcome, agent

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "url": HTTP_URL,
        "calls": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1},
        "step_seconds": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
    },
    "required": ["url"],
    "additionalProperties": False,
}


@agent("calls", input_schema=INPUT_SCHEMA)
def calls(ctx: StepContext, state: Any) -> Outcome:
    """POST ``{task_id, step, key}`` to ``url`` once per step, ``calls`` times."""
    statuses = list((state or {}).get("statuses", []))
    response = ctx.tool(
        "http_post",
        url=ctx.input["url"],
        json={"task_id": ctx.task_id, "step": ctx.step, "key": ctx.key},
    )
    statuses.append(response["status"])
    ctx.wait(ctx.input["step_seconds"])
    if len(statuses) >= ctx.input["calls"]:
        return ctx.done({"calls": ctx.input["calls"], "statuses": statuses})
    return ctx.next({"statuses": statuses})
