"""``fanout``: one child task per input (V2.md 10), then the children's results in input
order, once all of them (or, with ``mode: "any"``, the first one) are terminal.

A child input that the child's agent refuses is refused at submission (``422`` with
``errors`` on ``input.inputs.<i>.<field>``): :func:`check_input` runs the same check as
``POST /v1/tasks`` on every child input. A child's failure does not fail the fanout:
its status says ``failed`` and its result is ``null``. With ``"any"`` the other children
keep running; their statuses are those at the moment the fanout completed.
"""

from __future__ import annotations

from typing import Any

from app.engine import registry
from app.engine.context import StepContext
from outlast.sdk import Outcome, agent

MAX_INPUTS = 100

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "agent": {"type": "string", "minLength": 1, "maxLength": 200},
        "inputs": {
            "type": "array",
            "items": {"type": "object"},
            "minItems": 1,
            "maxItems": MAX_INPUTS,
        },
        "mode": {"enum": ["all", "any"], "default": "all"},
    },
    "required": ["agent", "inputs"],
    "additionalProperties": False,
}


def check_input(input: dict[str, Any]) -> dict[str, list[str]]:
    """The child agent exists and accepts every child input (``422`` ``errors``)."""
    child = registry.get_agent(input["agent"])
    if child is None:
        return {"input.agent": [f"Unknown agent {input['agent']!r}."]}
    errors: dict[str, list[str]] = {}
    for i, child_input in enumerate(input["inputs"]):
        for path, messages in registry.check_input(child, child_input).items():
            # "input.message" of the child is "input.inputs.<i>.message" of the fanout.
            rest = path[len("input") :] if path.startswith("input") else f".{path}"
            errors.setdefault(f"input.inputs.{i}{rest}", []).extend(messages)
    return errors


@agent("fanout", input_schema=INPUT_SCHEMA)
def fanout(ctx: StepContext, state: Any) -> Outcome:
    """Run one child task per input and collect their results in input order."""
    if state is None:
        ids = [ctx.spawn(ctx.input["agent"], child) for child in ctx.input["inputs"]]
        return ctx.wait_for(ids, ctx.input["mode"], {"children": ids})
    ids = state["children"]
    found = ctx.children(ids)
    return ctx.done(
        {
            "children": ids,
            "statuses": [c["status"] if c else None for c in found],
            "results": [c["result"] if c else None for c in found],
        }
    )
