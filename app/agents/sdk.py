"""The agent author's vocabulary: the agent declaration and what a step may return.

An agent is a name, an input JSON Schema and a step function ``step(ctx, state)``. The
engine calls the step function once per step with the state the previous step returned
(``None`` for the first step) and a :class:`~app.agents.context.StepContext`; the return
value says what comes next:

- :class:`Continue` (``ctx.next(state)``): checkpoint ``state`` and run the next step;
- :class:`Done` (``ctx.done(result)``): finish the task with ``result``;
- :class:`WaitForInput` (``ctx.ask(prompt, schema, state)``): checkpoint, then wait for
  ``POST /input``; the next step sees the answer as ``ctx.human_input``;
- :class:`SleepUntil` (``ctx.sleep(seconds, state)``): checkpoint, then run the next step
  at a wall-clock time (a durable timer; no worker waits);
- :class:`Fail` (``ctx.fail(message, type=...)``): fail the task with that error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.agents.context import StepContext


# --- outcomes ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Continue:
    """Checkpoint ``state`` and enqueue the next step."""

    state: Any = None


@dataclasses.dataclass(frozen=True)
class Done:
    """Checkpoint and complete the task with ``result`` (any JSON value but ``null``)."""

    result: Any


@dataclasses.dataclass(frozen=True)
class WaitForInput:
    """Checkpoint ``state``, then wait (holding no worker) for an answer to ``prompt``
    matching the JSON Schema ``schema``."""

    prompt: str
    schema: Mapping[str, Any]
    state: Any = None


@dataclasses.dataclass(frozen=True)
class SleepUntil:
    """Checkpoint ``state`` and run the next step at ``wake_at`` (timezone-aware)."""

    wake_at: datetime
    state: Any = None


@dataclasses.dataclass(frozen=True)
class Fail:
    """Fail the task with ``{"type": type, "message": message}``."""

    message: str
    type: str = "agent_error"


Outcome = Continue | Done | WaitForInput | SleepUntil | Fail


# --- errors -----------------------------------------------------------------------------


class RetryableError(Exception):
    """Raise this from a step (or a tool) for a transient failure: the step is re-run
    with backoff, at most ``OUTLAST_STEP_RETRIES`` times, then the task fails."""


class AgentError(Exception):
    """A deliberate agent failure: the task fails with ``agent_error`` and this message."""


class Cancelled(Exception):
    """Raised inside a step once its task is cancelled (or its lease lost): the engine
    discards the step's work. Agents should let it propagate."""


# --- the agent declaration -------------------------------------------------------------

StepFunction = Callable[["StepContext", Any], Outcome]


@dataclasses.dataclass(frozen=True)
class Agent:
    """A registered agent: ``name``, ``input_schema`` (JSON Schema of ``input``), the
    step function, and a one-line ``description``."""

    name: str
    input_schema: Mapping[str, Any]
    step: StepFunction
    description: str = ""

    def defaults(self, input: Mapping[str, Any]) -> dict[str, Any]:
        """``input`` with the schema's top-level ``default`` values filled in."""
        filled = dict(input)
        for key, prop in (self.input_schema.get("properties") or {}).items():
            if key not in filled and isinstance(prop, Mapping) and "default" in prop:
                filled[key] = prop["default"]
        return filled


def agent(
    name: str, *, input_schema: Mapping[str, Any], description: str = ""
) -> Callable[[StepFunction], Agent]:
    """Decorator: declare and register the step function as agent ``name``.

    >>> @agent("hello", input_schema={"type": "object"})
    ... def hello(ctx, state):
    ...     return ctx.done({"hello": "world"})
    """
    from app.agents import registry

    def wrap(step: StepFunction) -> Agent:
        declared = Agent(
            name=name,
            input_schema=input_schema,
            step=step,
            description=description or (step.__doc__ or "").strip().split("\n")[0],
        )
        registry.register(declared)
        return declared

    return wrap
