"""Where agents are found by name: the built-in package, the modules named in
``OUTLAST_AGENTS``, and the ``outlast.agents`` entry point group.

Importing a module that uses the :func:`app.agents.agent` decorator registers its
agents. An entry point may also name an :class:`~app.agents.sdk.Agent` object directly.
Loading happens lazily on the first lookup (and again when ``OUTLAST_AGENTS`` changes),
so web and worker processes see the same agents.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from app import settings as settings_mod
from app.agents.sdk import Agent

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "outlast.agents"
BUILTIN_MODULE = "app.agents.builtin"

_agents: dict[str, Agent] = {}
_loaded_modules: set[str] = set()
_entry_points_loaded = False
_lock = threading.RLock()


class AgentConflict(ValueError):
    """Two different step functions were registered under one name."""


def register(agent: Agent) -> Agent:
    """Add ``agent`` to the registry (the ``@agent`` decorator calls this).

    Registering the same step function again (a module re-imported) is a no-op; a
    different function under a taken name is an error, so a plugin cannot silently
    replace a built-in.
    """
    Draft202012Validator.check_schema(dict(agent.input_schema))
    with _lock:
        existing = _agents.get(agent.name)
        if existing is not None and _identity(existing) != _identity(agent):
            raise AgentConflict(
                f"agent {agent.name!r} is already registered by {_identity(existing)}"
            )
        _agents[agent.name] = agent
    return agent


def _identity(agent: Agent) -> str:
    return f"{agent.step.__module__}.{agent.step.__qualname__}"


def _import(module: str, *, required: bool = False) -> None:
    if module in _loaded_modules:
        return
    _loaded_modules.add(module)  # tried once: a broken plugin is logged, not retried per lookup
    try:
        importlib.import_module(module)
    except Exception:
        if required:
            _loaded_modules.discard(module)
            raise
        # One broken plugin must not hide every other agent; its agents are simply unknown.
        log.exception("could not import agent module %s (from OUTLAST_AGENTS)", module)


def load() -> None:
    """Import every agent source not imported yet (idempotent, thread-safe)."""
    global _entry_points_loaded
    with _lock:
        _import(BUILTIN_MODULE, required=True)
        if not _entry_points_loaded:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    loaded = ep.load()
                except Exception:  # one broken plugin must not hide every agent
                    log.exception("could not load agent entry point %s", ep.value)
                    continue
                if isinstance(loaded, Agent):
                    register(loaded)
            _entry_points_loaded = True
        for module in settings_mod.current().agents:
            _import(module)


def get_agent(name: str) -> Agent | None:
    """The agent registered as ``name``, or ``None``."""
    load()
    return _agents.get(name)


def names() -> list[str]:
    """Every registered agent name, sorted."""
    load()
    return sorted(_agents)


def _paths(error: ValidationError) -> list[str]:
    """Dotted paths an error belongs to, prefixed ``input``; an error about an object's
    keys (required, additionalProperties) is reported on the keys themselves."""
    base = ".".join(["input", *(str(p) for p in error.absolute_path)])
    instance = error.instance
    if error.validator == "required" and isinstance(instance, Mapping):
        for prop in error.validator_value:
            if prop not in instance and error.message.startswith(repr(prop)):
                return [f"{base}.{prop}"]
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        known = set((error.schema.get("properties") or {}).keys())
        extra = [k for k in instance if k not in known]
        if extra:
            return [f"{base}.{k}" for k in extra]
    return [base]


def _message(error: ValidationError) -> str:
    if error.validator == "required":
        return "is required"
    if error.validator == "additionalProperties":
        return "is not a known field"
    if error.validator == "pattern" and str(error.validator_value).lower().startswith("^[hh]"):
        return "must be an absolute http or https URL"
    return error.message


def validate_input(agent: Agent, input: Any) -> dict[str, list[str]]:
    """Check ``input`` against the agent's schema: ``{"input.<path>": [messages]}``,
    empty when valid (the API answers ``422`` with these as ``errors``)."""
    validator = Draft202012Validator(dict(agent.input_schema))
    errors: dict[str, list[str]] = {}
    for error in sorted(
        validator.iter_errors(input), key=lambda e: list(map(str, e.absolute_path))
    ):
        for path in _paths(error):
            errors.setdefault(path, []).append(_message(error))
    return errors
