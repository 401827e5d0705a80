"""``echo``: runs ``steps`` steps that wait ``step_seconds`` each and report progress."""

from __future__ import annotations

from typing import Any

from app.engine.context import StepContext
from outlast.sdk import AgentError, Outcome, agent

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "maxLength": 65536},  # V2.md 10
        "steps": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1},
        "step_seconds": {"type": "number", "minimum": 0, "maximum": 3600, "default": 0},
        "fail_at_step": {"type": "integer"},
    },
    "required": ["message"],
    "additionalProperties": False,
}


@agent("echo", input_schema=INPUT_SCHEMA)
def echo(ctx: StepContext, state: Any) -> Outcome:
    """Echo the message back after ``steps`` checkpointed steps."""
    steps = ctx.input["steps"]
    number = ctx.step + 1  # 1-based, as fail_at_step and progress count
    if ctx.input["step_seconds"] > 0:
        ctx.wait(ctx.input["step_seconds"])  # checks for cancellation at least once a second
    if ctx.input.get("fail_at_step") == number:
        raise AgentError(f"echo was asked to fail at step {number}")
    ctx.progress(number, steps, f"step {number} of {steps}")
    if number >= steps:
        return ctx.done({"message": ctx.input["message"], "steps": steps})
    return ctx.next({"steps_done": number})
