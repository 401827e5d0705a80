"""The agent author's vocabulary: agents, tools, what a step may return, and errors.

Everything here is plain data. ``@agent`` returns an :class:`Agent` and ``@tool`` a
:class:`Tool`; neither writes into any registry. The server finds these objects in the
modules it loads (the built-ins, ``OUTLAST_AGENTS``, the ``outlast.agents`` entry
points), so a module that uses only ``outlast`` registers its agents and tools in every
process that imports it.

An agent is a name, an input JSON Schema and a step function ``step(ctx, state)``. The
engine calls the step function once per step with the state the previous step returned
(``None`` for the first step) and a :class:`Context`; the return value says what comes
next:

- :class:`Continue` (``ctx.next(state)``): checkpoint ``state`` and run the next step;
- :class:`Done` (``ctx.done(result)``): finish the task with ``result``;
- :class:`WaitForInput` (``ctx.ask(prompt, schema, state)``): checkpoint, then wait for
  ``POST /input``; the next step sees the answer as ``ctx.human_input``;
- :class:`SleepUntil` (``ctx.sleep(seconds, state)``): checkpoint, then run the next step
  at a wall-clock time (a durable timer; no worker waits);
- :class:`Fail` (``ctx.fail(message, type=...)``): fail the task with that error;
- :class:`WaitForChildren` (``ctx.wait_for(ids, mode, state)``): checkpoint, then run the
  next step once all (or any one) of the child tasks ``ids`` (from ``ctx.spawn``) are
  terminal; no worker waits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

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


@dataclasses.dataclass(frozen=True)
class WaitForChildren:
    """Checkpoint ``state`` and run the next step once ``mode`` (``"all"`` or ``"any"``)
    of the child tasks ``ids`` are terminal (V2.md section 6); no worker waits."""

    ids: tuple[str, ...]
    mode: str = "all"
    state: Any = None


Outcome = Continue | Done | WaitForInput | SleepUntil | Fail | WaitForChildren


# --- errors -----------------------------------------------------------------------------


class RetryableError(Exception):
    """Raise this from a step (or a tool) for a transient failure: the step is re-run
    with backoff, at most ``OUTLAST_STEP_RETRIES`` times, then the task fails."""


class TransientToolError(RetryableError):
    """A connection error or timeout talking to a tool or model: the step is retried."""


class AgentError(Exception):
    """A deliberate agent failure: the task fails with ``agent_error`` and this message."""


class SpawnRefused(AgentError):
    """``ctx.spawn`` could not create the child: its agent is unknown or refuses the
    input. ``errors`` is what ``POST /v1/tasks`` would answer in a ``422``
    (``{"input.message": [...]}``). Uncaught, the task fails with ``agent_error``."""

    def __init__(self, message: str, errors: Mapping[str, Sequence[str]] | None = None):
        super().__init__(message)
        self.errors = dict(errors or {})


class Cancelled(Exception):
    """Raised inside a step once its task is cancelled (or its lease lost): the engine
    discards the step's work. Agents should let it propagate."""


# --- what a step sees -------------------------------------------------------------------


class Context(Protocol):
    """The ``ctx`` a step function receives (the engine implements it).

    Attributes: ``task_id``; ``step`` (0-based index of this step); ``attempt`` (1 +
    lost workers so far); ``input`` (the task's input with schema defaults filled in);
    ``human_input`` (the answer to the previous step's :meth:`ask`, else ``None``);
    ``key`` (the idempotency key the next tool or model call will carry).
    """

    task_id: str
    step: int
    attempt: int
    input: Mapping[str, Any]
    human_input: Any

    @property
    def key(self) -> str: ...

    def tool(self, name: str, /, **args: Any) -> Any:
        """Call tool ``name`` through the tool-call log (replayed, never repeated)."""

    def llm(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """A logged Chat Completions call; returns the assistant message."""

    def progress(
        self, current: int | float, total: int | float | None = None, message: str | None = None
    ) -> None:
        """Report progress (a ``task.progress`` event)."""

    def cancelled(self) -> bool: ...

    def check_cancelled(self) -> None: ...

    def wait(self, seconds: float) -> None: ...

    def next(self, state: Any = None) -> Continue: ...

    def done(self, result: Any) -> Done: ...

    def ask(self, prompt: str, schema: Mapping[str, Any], state: Any = None) -> WaitForInput: ...

    def sleep(self, seconds: float, state: Any = None) -> SleepUntil: ...

    def sleep_until(self, when: datetime, state: Any = None) -> SleepUntil: ...

    def fail(self, message: str, type: str = "agent_error") -> Fail: ...

    def spawn(
        self, agent: str, input: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> str:
        """Create a child task of the same tenant now and return its id; a re-run of
        the step gets the same id back (no second child). Raises :class:`SpawnRefused`."""

    def wait_for(
        self, ids: Sequence[str], mode: str = "all", state: Any = None
    ) -> WaitForChildren: ...

    def children(self, ids: Sequence[str] | None = None) -> list[dict[str, Any] | None]:
        """The children's current task representations (all of this task's children,
        in spawn order, when ``ids`` is ``None``)."""


# --- agents -----------------------------------------------------------------------------

StepFunction = Callable[[Context, Any], Outcome]


# A migration: ``(state, input) -> state``, the checkpoint of an older version made
# readable by this version's step function.
Migration = Callable[[Any, Mapping[str, Any]], Any]

# Versions name queues and metric labels: short and plain.
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_version(version: str) -> str:
    """``version`` if it is 1 to 64 letters, digits, ``.``, ``_`` or ``-``."""
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(
            f"an agent version must be 1 to 64 letters, digits, '.', '_' or '-', not {version!r}"
        )
    return version


@dataclasses.dataclass(frozen=True)
class Agent:
    """An agent: ``name``, ``input_schema`` (JSON Schema of ``input``), the step
    function, a one-line ``description``, its ``version`` (``"1"`` by default), and the
    migrations from older versions it declares (:meth:`migrate`).

    A task is pinned to the version it was submitted on: a worker runs its steps only
    with the code of that version, or after a migration from it declared here.
    """

    name: str
    input_schema: Mapping[str, Any]
    step: StepFunction
    description: str = ""
    version: str = "1"
    migrations: dict[str, Migration] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def identity(self) -> str:
        """Where the step function is defined (two agents are one if this matches)."""
        return f"{self.step.__module__}.{self.step.__qualname__}"

    def migrate(self, *, from_version: str) -> Callable[[Migration], Migration]:
        """Decorator: ``fn(state, input) -> state`` turns a checkpoint written by version
        ``from_version`` into one this version reads. A task on ``from_version`` that
        reaches a worker without that version's code is migrated at its next step
        boundary (event ``task.migrated``) and continues on this version.

        >>> @agent("hello", input_schema={"type": "object"}, version="2")
        ... def hello(ctx, state):
        ...     return ctx.done(state)
        >>> @hello.migrate(from_version="1")
        ... def from_v1(state, input):
        ...     return {"names": [state]} if state else None
        >>> sorted(hello.migrations)
        ['1']
        """
        check_version(from_version)
        if from_version == self.version:
            raise ValueError(
                f"agent {self.name!r} version {self.version} cannot migrate from itself"
            )

        def wrap(fn: Migration) -> Migration:
            if from_version in self.migrations and self.migrations[from_version] is not fn:
                raise ValueError(
                    f"agent {self.name!r} version {self.version} already has a migration "
                    f"from version {from_version}"
                )
            self.migrations[from_version] = fn
            return fn

        return wrap

    def defaults(self, input: Mapping[str, Any]) -> dict[str, Any]:
        """``input`` with the schema's top-level ``default`` values filled in."""
        filled = dict(input)
        for key, prop in (self.input_schema.get("properties") or {}).items():
            if key not in filled and isinstance(prop, Mapping) and "default" in prop:
                filled[key] = prop["default"]
        return filled


def agent(
    name: str, *, input_schema: Mapping[str, Any], description: str = "", version: str = "1"
) -> Callable[[StepFunction], Agent]:
    """Decorator: declare the step function as agent ``name`` at ``version`` (returns
    the :class:`Agent`; declare migrations from older versions with its ``.migrate``).

    >>> @agent("hello", input_schema={"type": "object"})
    ... def hello(ctx, state):
    ...     return ctx.done({"hello": "world"})
    >>> hello.name, hello.version
    ('hello', '1')
    """
    check_version(version)

    def wrap(step: StepFunction) -> Agent:
        return Agent(
            name=name,
            input_schema=input_schema,
            step=step,
            description=description or (step.__doc__ or "").strip().split("\n")[0],
            version=version,
        )

    return wrap


# --- tools ------------------------------------------------------------------------------


class NotFound:
    """What ``reconcile(key)`` returns when the callee has no record of ``key``."""

    def __repr__(self) -> str:
        return "NOT_FOUND"


NOT_FOUND = NotFound()


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call of a tool, as the tool sees it: ``key`` is its idempotency key, the same
    on every repeat of the call (an HTTP tool sends it as ``Idempotency-Key``)."""

    task_id: str
    step: int
    index: int
    key: str
    attempt: int  # 1 for the first try of this call, 2+ when it is repeated after a crash
    check_cancelled: Callable[[], None]  # raises Cancelled once the task is cancelled


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool: ``fn(call, **args)`` returning a JSON value, under ``name``.

    ``idempotent=False`` tools may supply ``reconcile(key)`` returning the output of the
    call made with ``key`` or :data:`NOT_FOUND`; it is asked before an in-doubt call is
    repeated. ``summarize(args)`` shortens what the log stores of the arguments.
    ``compensate`` names the tool that undoes this one. Calling the object calls ``fn``.
    """

    name: str
    fn: Callable[..., Any]
    idempotent: bool = True
    reconcile: Callable[[str], Any] | None = None
    summarize: Callable[[Mapping[str, Any]], Any] | None = None
    compensate: str | None = None

    def __call__(self, call: ToolCall, /, **args: Any) -> Any:
        return self.fn(call, **args)


def tool(
    name: str,
    *,
    compensate: str | None = None,
    idempotent: bool = True,
    reconcile: Callable[[str], Any] | None = None,
    summarize: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Callable[[Callable[..., Any]], Tool]:
    """Decorator: declare ``fn(call, **args)`` as tool ``name`` (returns the :class:`Tool`)."""

    def wrap(fn: Callable[..., Any]) -> Tool:
        return Tool(name, fn, idempotent, reconcile, summarize, compensate)

    return wrap
