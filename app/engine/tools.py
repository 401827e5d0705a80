"""Tools as the engine sees them: the call key, and lookup by name.

A tool is declared with :func:`outlast.tool` (plain data); the registry finds it in
the modules it loads. The engine logs each call (:mod:`app.store.tool_calls`): a
completed call is never made again for the same step; an in-doubt one is repeated with
the same key, or first settled by the tool's ``reconcile(key)`` hook when the tool is
not idempotent.
"""

from __future__ import annotations

import hashlib

from app.engine import registry
from outlast.sdk import Tool


def get_tool(name: str) -> Tool | None:
    """The tool registered as ``name`` (agent modules are loaded first)."""
    return registry.get_tool(name)


def call_key(task_id: str, step: int, call_index: int) -> str:
    """The idempotency key of a call: sha256 of ``{task_id}:{step}:{call_index}`` (hex)."""
    return hashlib.sha256(f"{task_id}:{step}:{call_index}".encode()).hexdigest()
