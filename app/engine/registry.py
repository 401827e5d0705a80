"""Where agents and tools are found by name: the built-in package, the modules named
in ``OUTLAST_AGENTS``, and the ``outlast.agents`` entry point group.

The SDK is plain data (:func:`outlast.agent` returns an :class:`~outlast.Agent`,
:func:`outlast.tool` a :class:`~outlast.Tool`); the registry imports each source and
collects the agent and tool objects it finds among the module's names. An entry point
may name a module or an agent or tool object directly. Loading happens lazily on the
first lookup (and again when ``OUTLAST_AGENTS`` changes), so web and worker processes
see the same agents.

Agents are keyed by ``(name, version)``: one process may hold several versions of an
agent, and each version may declare migrations from older ones (V2.md section 7).
:func:`get_agent` without a version gives the newest, the one a new submission is
pinned to; :func:`resolve` says how this process runs a step of a given version (with
that version's code, or after a migration), and :func:`handled` lists every version it
can take, which is what a worker subscribes to and advertises.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator

from app import settings as settings_mod
from app.validation import schema_errors
from outlast.sdk import Agent, Migration, Tool

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "outlast.agents"
BUILTIN_MODULE = "app.agents.builtin"

_agents: dict[tuple[str, str], Agent] = {}
_tools: dict[str, Tool] = {}
_loaded_modules: set[str] = set()
_entry_points_loaded = False
_lock = threading.RLock()


class AgentConflict(ValueError):
    """Two different step functions were registered under one name and version."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions naturally: ``"2" < "10"``, ``"1.9" < "1.10"``, numbers before words."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[._-]", version)
    )


def register(agent: Agent) -> Agent:
    """Add ``agent`` to the registry.

    Registering the same step function again (a module re-imported, an agent
    re-exported by another module) is a no-op; a different function under a taken name
    and version is an error, so a plugin cannot silently replace a built-in. Another
    version of a registered name is added beside it.
    """
    Draft202012Validator.check_schema(dict(agent.input_schema))
    with _lock:
        key = (agent.name, agent.version)
        existing = _agents.get(key)
        if existing is not None and existing.identity != agent.identity:
            raise AgentConflict(
                f"agent {agent.name!r} version {agent.version} is already registered by "
                f"{existing.identity}"
            )
        _agents[key] = agent
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


def get_agent(name: str, version: str | None = None) -> Agent | None:
    """The agent registered as ``name`` at ``version`` (the newest version when
    ``version`` is ``None``: what a new task is pinned to), or ``None``."""
    load()
    if version is not None:
        return _agents.get((name, version))
    found = versions(name)
    return _agents[(name, found[-1])] if found else None


def versions(name: str) -> list[str]:
    """The versions of ``name`` registered here, oldest first."""
    load()
    return sorted((v for (n, v) in list(_agents) if n == name), key=version_key)


class Plan(NamedTuple):
    """How this process runs a step of a task pinned to ``from_version``: with
    ``agent`` (whose ``version`` is ``from_version``), or, when ``migration`` is set,
    after migrating the checkpoint from ``from_version`` to ``agent.version``."""

    agent: Agent
    from_version: str
    migration: Migration | None = None

    @property
    def migration_name(self) -> str:
        """The migration as an author finds it: ``module.function``."""
        fn = self.migration
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def resolve(name: str, version: str) -> Plan | None:
    """How this process can run a step of ``name`` pinned to ``version``: its own code
    of that version first; else the newest registered version that declares a migration
    from it; ``None`` when it can do neither (the step is left for a worker that can)."""
    load()
    exact = _agents.get((name, version))
    if exact is not None:
        return Plan(exact, version)
    for candidate in reversed(versions(name)):
        agent = _agents[(name, candidate)]
        migration = agent.migrations.get(version)
        if migration is not None:
            return Plan(agent, version, migration)
    return None


def handled() -> list[tuple[str, str]]:
    """Every ``(name, version)`` this process can run or migrate from, sorted: the step
    queues a worker consumes and the versions it advertises."""
    load()
    found = set(_agents)
    for agent in list(_agents.values()):
        found.update((agent.name, older) for older in agent.migrations)
    return sorted(found, key=lambda pair: (pair[0], version_key(pair[1])))


def get_tool(name: str) -> Tool | None:
    """The tool registered as ``name``, or ``None``."""
    load()
    return _tools.get(name)


def names() -> list[str]:
    """Every registered agent name, sorted."""
    load()
    return sorted({name for name, _ in list(_agents)})


def validate_input(agent: Agent, input: Any) -> dict[str, list[str]]:
    """Check ``input`` against the agent's schema: ``{"input.<path>": [messages]}``,
    empty when valid (the API answers ``422`` with these as ``errors``)."""
    return schema_errors(agent.input_schema, input)


def check_input(agent: Agent, input: Any) -> dict[str, list[str]]:
    """Everything that decides whether ``agent`` accepts ``input``: its schema, then
    the built-ins' checks beyond a schema (``INPUT_CHECKS`` of the built-in package,
    looked up by name, as the registry finds the package). Used by ``POST /v1/tasks``
    and by ``ctx.spawn``, so a child is refused exactly as a submission would be."""
    errors = validate_input(agent, input)
    if errors:
        return errors
    load()
    checks = getattr(importlib.import_module(BUILTIN_MODULE), "INPUT_CHECKS", {})
    check = checks.get(agent.name)
    return check(input) if check is not None else {}
