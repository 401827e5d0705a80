"""Tools: named side effects an agent calls through ``ctx.tool(name, **args)``.

A tool is a function ``fn(call, **args)`` returning a JSON value. ``call`` is the
:class:`ToolCall` with the call's idempotency ``key`` (the same on every repeat of the
call, so an HTTP tool sends it as ``Idempotency-Key`` and the callee deduplicates).
The engine logs each call (:mod:`app.tool_calls`): a completed call is never made again
for the same step; an in-doubt one is repeated with the same key, or first settled by
the tool's ``reconcile(key)`` hook when the tool is not idempotent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from app.agents.sdk import RetryableError


class TransientToolError(RetryableError):
    """A connection error or timeout talking to a tool or model: the step is retried."""


class NotFound:
    """What ``reconcile(key)`` returns when the callee has no record of ``key``."""

    def __repr__(self) -> str:
        return "NOT_FOUND"


NOT_FOUND = NotFound()


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call of a tool, as the tool sees it."""

    task_id: str
    step: int
    index: int
    key: str
    attempt: int  # 1 for the first try of this call, 2+ when it is repeated after a crash
    check_cancelled: Callable[[], None]  # raises Cancelled once the task is cancelled


@dataclasses.dataclass(frozen=True)
class Tool:
    """A registered tool.

    ``idempotent=False`` tools may supply ``reconcile(key)`` returning the output of the
    call made with ``key`` or :data:`NOT_FOUND`; it is asked before an in-doubt call is
    repeated. ``summarize(args)`` shortens what the log stores of the arguments.
    """

    name: str
    fn: Callable[..., Any]
    idempotent: bool = True
    reconcile: Callable[[str], Any] | None = None
    summarize: Callable[[Mapping[str, Any]], Any] | None = None


_tools: dict[str, Tool] = {}
_lock = threading.Lock()


def tool(
    name: str,
    *,
    idempotent: bool = True,
    reconcile: Callable[[str], Any] | None = None,
    summarize: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(call, **args)`` as tool ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        with _lock:
            _tools[name] = Tool(name, fn, idempotent, reconcile, summarize)
        return fn

    return wrap


def get_tool(name: str) -> Tool | None:
    """The tool registered as ``name`` (agent modules are loaded first)."""
    from app.agents import registry

    registry.load()
    return _tools.get(name)


def call_key(task_id: str, step: int, call_index: int) -> str:
    """The idempotency key of a call: sha256 of ``{task_id}:{step}:{call_index}`` (hex)."""
    return hashlib.sha256(f"{task_id}:{step}:{call_index}".encode()).hexdigest()
