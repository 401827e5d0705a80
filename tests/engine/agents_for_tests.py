"""Agents that only the engine's tests use (loaded through ``OUTLAST_AGENTS``)."""

from __future__ import annotations

import json
from typing import Any

from app.engine.context import StepContext
from outlast import agent

URL_INPUT = {
    "type": "object",
    "properties": {"url": {"type": "string"}, "question": {"type": "string"}},
    "required": ["url"],
}


@agent("test_two_calls", input_schema=URL_INPUT)
def two_calls(ctx: StepContext, state: Any):
    """One step, two tool calls: ``/fast`` then ``/slow``."""
    first = ctx.tool("http_post", url=ctx.input["url"] + "/fast", json={"call": 0})
    second = ctx.tool("http_post", url=ctx.input["url"] + "/slow", json={"call": 1})
    return ctx.done({"statuses": [first["status"], second["status"]], "attempt": ctx.attempt})


LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up in the ledger.",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string"}},
            "required": ["word"],
        },
    },
}


@agent("test_llm_tools", input_schema=URL_INPUT)
def llm_tools(ctx: StepContext, state: Any):
    """A model loop: each step asks the model; its tool calls run as ``http_post`` to
    ``{url}/lookup`` and their results go back to the model in the next step."""
    messages = state["messages"] if state else [{"role": "user", "content": ctx.input["question"]}]
    reply = ctx.llm(messages, tools=[LOOKUP_TOOL])
    messages = [*messages, reply]
    if not reply.get("tool_calls"):
        return ctx.done({"answer": reply["content"], "attempt": ctx.attempt})
    for tool_call in reply["tool_calls"]:
        arguments = json.loads(tool_call["function"]["arguments"])
        looked_up = ctx.tool("http_post", url=ctx.input["url"] + "/lookup", json=arguments)
        messages.append(
            {
                "role": "tool",
                "tool_call_id": tool_call["id"],
                "content": json.dumps(looked_up["body"]),
            }
        )
    return ctx.next({"messages": messages})


@agent("test_bad_output", input_schema={"type": "object"})
def bad_output(ctx: StepContext, state: Any):
    """Returns a result that is not JSON."""
    return ctx.done({"when": object()})


@agent("test_progress_then_compute", input_schema={"type": "object"})
def progress_then_compute(ctx: StepContext, state: Any):
    """Reports progress, then computes for 3 s without touching its context."""
    import time

    ctx.progress(1, 2, "computing")
    time.sleep(3.0)
    return ctx.done({"computed": True})
