"""``calls``: one idempotent HTTP POST per step, keyed by the tool call's key.

With ``compensate: true`` (V2.md 10) each POST is a call to a tool that declares a
compensation, ``calls_undo``: when the task fails or is cancelled, every completed POST
is undone, newest first, by a ``DELETE`` of the same URL with the original body
``{"task_id", "step", "key"}`` and ``Idempotency-Key: <key>-undo``. ``fail_at_call: n``
makes the step of call ``n`` (1-based) raise an agent error instead of calling.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from app.agents.builtin.schemas import HTTP_URL
from app.engine.context import StepContext
from app.engine.http_tools import http_delete, http_post
from outlast.sdk import AgentError, Outcome, Tool, ToolCall, agent, tool

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "url": HTTP_URL,
        "calls": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1},
        "step_seconds": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
        "compensate": {"type": "boolean", "default": False},
        "fail_at_call": {"type": "integer", "minimum": 1},
    },
    "required": ["url"],
    "additionalProperties": False,
}


@tool("calls_undo")
def calls_undo(call: ToolCall, args: dict[str, Any], output: Any = None) -> dict[str, Any]:
    """Undo one of the ``calls`` agent's POSTs: ``DELETE`` its URL with its body, keyed
    ``<key>-undo`` (``call.key``). A 4xx answer is final (the undo counts as failed);
    5xx answers and connection errors are retried (``http_delete``, then the engine)."""
    answer = http_delete(call, url=args["url"], json=args.get("json"))
    if answer["status"] >= 400:
        raise AgentError(f"DELETE {args['url']} answered {answer['status']}")
    return answer


@functools.cache
def _undoable_post() -> Tool:
    """``http_post`` declaring ``calls_undo`` as its compensation, for this agent only
    (built here rather than at module level, where the registry would take it for a
    second ``http_post``)."""
    return dataclasses.replace(http_post, compensate=calls_undo.name)


@agent("calls", input_schema=INPUT_SCHEMA)
def calls(ctx: StepContext, state: Any) -> Outcome:
    """POST ``{task_id, step, key}`` to ``url`` once per step, ``calls`` times."""
    statuses = list((state or {}).get("statuses", []))
    if ctx.input.get("fail_at_call") == ctx.step + 1:
        raise AgentError(f"fail_at_call: call {ctx.step + 1} was not made")
    args = {
        "url": ctx.input["url"],
        "json": {"task_id": ctx.task_id, "step": ctx.step, "key": ctx.key},
    }
    if ctx.input["compensate"]:
        response = ctx.call_as("http_post", _undoable_post(), args)
    else:
        response = ctx.tool("http_post", **args)
    statuses.append(response["status"])
    ctx.wait(ctx.input["step_seconds"])
    if len(statuses) >= ctx.input["calls"]:
        return ctx.done({"calls": ctx.input["calls"], "statuses": statuses})
    return ctx.next({"statuses": statuses})
