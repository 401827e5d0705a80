"""Where agents and tools are found by name: the built-in package, the modules named
in ``OUTLAST_AGENTS``, and the ``outlast.agents`` entry point group.

The SDK is plain data (:func:`outlast.agent` returns an :class:`~outlast.Agent`,
:func:`outlast.tool` a :class:`~outlast.Tool`); the registry imports each source and
collects the agent and tool objects it finds among the module's names. An entry point
may name a module or an agent or tool object directly. Loading happens lazily on the
first lookup (and again when ``OUTLAST_AGENTS`` changes), so web and worker processes
see the same agents.
"""

from __future__ import annotations

import importlib
import logging
import threading
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from jsonschema import Draft202012Validator

from app import settings as settings_mod
from app.validation import schema_errors
from outlast.sdk import Agent, Tool

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "outlast.agents"
BUILTIN_MODULE = "app.agents.builtin"

_agents: dict[str, Agent] = {}
_tools: dict[str, Tool] = {}
_loaded_modules: set[str] = set()
_entry_points_loaded = False
_lock = threading.RLock()


class AgentConflict(ValueError):
    """Two different step functions were registered under one name."""


def register(agent: Agent) -> Agent:
    """Add ``agent`` to the registry.

    Registering the same step function again (a module re-imported, an agent
    re-exported by another module) is a no-op; a different function under a taken name
    is an error, so a plugin cannot silently replace a built-in.
    """
    Draft202012Validator.check_schema(dict(agent.input_schema))
    with _lock:
        existing = _agents.get(agent.name)
        if existing is not None and existing.identity != agent.identity:
            raise AgentConflict(
                f"agent {agent.name!r} is already registered by {existing.identity}"
            )
        _agents[agent.name] = agent
    return agent


def register_tool(tool: Tool) -> Tool:
    """Add ``tool`` to the registry (a later declaration of a name replaces it)."""
    with _lock:
        _tools[tool.name] = tool
    return tool


def collect(module: ModuleType) -> None:
    """Register every agent and tool object among ``module``'s names."""
    for value in list(vars(module).values()):
        if isinstance(value, Agent):
            register(value)
        elif isinstance(value, Tool):
            register_tool(value)


def _import(module: str, *, required: bool = False) -> None:
    if module in _loaded_modules:
        return
    _loaded_modules.add(module)  # tried once: a broken plugin is logged, not retried per lookup
    try:
        collect(importlib.import_module(module))
    except Exception:
        if required:
            _loaded_modules.discard(module)
            raise
        # One broken plugin must not hide every other agent; its agents are simply unknown.
        log.exception("could not import agent module %s (from OUTLAST_AGENTS)", module)


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception:  # one broken plugin must not hide every agent
            log.exception("could not load agent entry point %s", ep.value)
            continue
        if isinstance(loaded, ModuleType):
            collect(loaded)
        elif isinstance(loaded, Agent):
            register(loaded)
        elif isinstance(loaded, Tool):
            register_tool(loaded)


def load() -> None:
    """Import every agent source not imported yet (idempotent, thread-safe)."""
    global _entry_points_loaded
    with _lock:
        _import(BUILTIN_MODULE, required=True)
        if not _entry_points_loaded:
            _load_entry_points()
            _entry_points_loaded = True
        for module in settings_mod.current().agents:
            _import(module)


def get_agent(name: str) -> Agent | None:
    """The agent registered as ``name``, or ``None``."""
    load()
    return _agents.get(name)


def get_tool(name: str) -> Tool | None:
    """The tool registered as ``name``, or ``None``."""
    load()
    return _tools.get(name)


def names() -> list[str]:
    """Every registered agent name, sorted."""
    load()
    return sorted(_agents)


def validate_input(agent: Agent, input: Any) -> dict[str, list[str]]:
    """Check ``input`` against the agent's schema: ``{"input.<path>": [messages]}``,
    empty when valid (the API answers ``422`` with these as ``errors``)."""
    return schema_errors(agent.input_schema, input)
