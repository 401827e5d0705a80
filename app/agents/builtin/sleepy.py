"""``sleepy``: sleeps on a durable timer, then completes."""

from __future__ import annotations

from typing import Any

from app.engine.context import StepContext
from outlast.sdk import Outcome, agent

INPUT_SCHEMA = {
    "type": "object",
    "properties": {"seconds": {"type": "number", "minimum": 1, "maximum": 604800}},
    "required": ["seconds"],
    "additionalProperties": False,
}


@agent("sleepy", input_schema=INPUT_SCHEMA)
def sleepy(ctx: StepContext, state: Any) -> Outcome:
    """Sleep ``seconds`` without holding a worker, then report it."""
    seconds = ctx.input["seconds"]
    if state is None:
        return ctx.sleep(seconds, {"sleeping": True})
    return ctx.done({"slept": seconds})
