"""``approval``: asks a human a yes/no question and returns the answer."""

from __future__ import annotations

from typing import Any

from app.engine.context import StepContext
from outlast.sdk import Outcome, agent

INPUT_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}},
    "required": ["question"],
    "additionalProperties": False,
}

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "comment": {"type": "string"}},
    "required": ["approved"],
}


@agent("approval", input_schema=INPUT_SCHEMA)
def approval(ctx: StepContext, state: Any) -> Outcome:
    """Ask ``question``; complete with the human's ``approved`` and ``comment``."""
    if ctx.human_input is None:
        return ctx.ask(ctx.input["question"], ANSWER_SCHEMA)
    answer = ctx.human_input
    return ctx.done({"approved": answer["approved"], "comment": answer.get("comment")})
