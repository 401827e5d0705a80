"""Agents of the tool-call-log fault tests (loaded through ``OUTLAST_AGENTS``)."""

from __future__ import annotations

from typing import Any

from app.engine.context import StepContext
from outlast import agent

URL_INPUT = {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}


@agent("test_attempt_in_args", input_schema=URL_INPUT)
def attempt_in_args(ctx: StepContext, state: Any):
    """Not deterministic on purpose: call 0 carries the attempt number, so a re-run after
    a lost worker asks call 0 with other arguments. Call 1 is the one a test holds open."""
    first = ctx.tool("http_post", url=ctx.input["url"] + "/first", json={"attempt": ctx.attempt})
    ctx.tool("http_post", url=ctx.input["url"] + "/hold", json={"after": first["status"]})
    return ctx.done({"first": first["body"], "attempt": ctx.attempt})


@agent("test_post_once", input_schema=URL_INPUT)
def post_once(ctx: StepContext, state: Any):
    """One http_post; completes with the body it got."""
    return ctx.done({"body": ctx.tool("http_post", url=ctx.input["url"])["body"]})
