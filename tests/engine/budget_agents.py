"""An agent for the budget tests (loaded through ``OUTLAST_AGENTS`` by the test)."""

from __future__ import annotations

from typing import Any

from outlast import agent


@agent("test_swallows_refusals", input_schema={"type": "object"})
def swallows_refusals(ctx, state: Any):
    """Makes three calls and catches whatever they raise (a refusal included)."""
    made = 0
    for index in range(3):
        try:
            ctx.tool("http_post", url=ctx.input["url"], json={"call": index})
            made += 1
        except Exception:  # noqa: BLE001 - on purpose: the budget must hold anyway
            pass
    return ctx.done({"made": made})
