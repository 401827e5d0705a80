"""Agent versions in the SDK and the registry (no servers): declaring versions and
migrations, and how a process decides whether it can take a step of a version."""

from __future__ import annotations

import uuid

import pytest

from app.engine import registry
from outlast import agent


def unique(name: str) -> str:
    # The registry lives as long as the process: every test registers names of its own.
    return f"{name}_{uuid.uuid4().hex[:8]}"


def declare(name: str, version: str, body: str = "v"):
    @agent(name, input_schema={"type": "object"}, version=version)
    def step(ctx, state):  # pragma: no cover - never run here
        return ctx.done({"ran_on": body})

    step.step.__qualname__ = f"step_{version}_{body}"  # one step function each
    return step


@pytest.fixture
def no_database_settings():
    from app import settings as settings_mod
    from app.settings import Settings

    previous = settings_mod._current
    yield settings_mod.configure(Settings.from_env({}))
    settings_mod._current = previous


def test_an_agent_is_version_1_unless_it_says_otherwise():
    @agent("plain", input_schema={"type": "object"})
    def plain(ctx, state):  # pragma: no cover
        return ctx.done({})

    assert plain.version == "1"
    assert plain.migrations == {}


@pytest.mark.parametrize("bad", ["", "1 0", "v/2", "x" * 65, 2])
def test_a_version_must_be_short_and_plain(bad):
    with pytest.raises(ValueError):
        agent("plain", input_schema={"type": "object"}, version=bad)


def test_migrate_records_a_function_from_an_older_version():
    v2 = declare(unique("m"), "2")

    @v2.migrate(from_version="1")
    def from_v1(state, input):
        return {"items": state["old"]}

    assert v2.migrations == {"1": from_v1}
    assert from_v1({"old": [1]}, {}) == {"items": [1]}  # the decorator returns the function
    with pytest.raises(ValueError):
        v2.migrate(from_version="2")  # not from itself
    with pytest.raises(ValueError):
        v2.migrate(from_version="1")(lambda state, input: state)  # one per version


def test_versions_are_ordered_naturally():
    assert sorted(["10", "2", "1.10", "1.9", "1"], key=registry.version_key) == [
        "1",
        "1.9",
        "1.10",
        "2",
        "10",
    ]


def test_several_versions_of_one_agent_live_side_by_side(no_database_settings):
    name = unique("side")
    v1, v2 = declare(name, "1"), declare(name, "2")
    registry.register(v1)
    registry.register(v2)
    registry.register(v2)  # the same function again: a no-op

    assert registry.versions(name) == ["1", "2"]
    assert registry.get_agent(name) is v2  # what a new task is pinned to: the newest
    assert registry.get_agent(name, "1") is v1
    assert registry.get_agent(name, "3") is None
    with pytest.raises(registry.AgentConflict):
        registry.register(declare(name, "2", "another"))


def test_a_step_runs_on_its_own_version_else_after_a_migration_else_nowhere(
    no_database_settings,
):
    name = unique("plan")
    v2, v3 = declare(name, "2"), declare(name, "3")
    v2.migrate(from_version="1")(lambda state, input: state)
    v3.migrate(from_version="1")(lambda state, input: state)
    registry.register(v2)
    registry.register(v3)

    # its own version's code first, with no migration
    assert registry.resolve(name, "2") == registry.Plan(v2, "2")
    # else the newest version that migrates from it
    plan = registry.resolve(name, "1")
    assert (plan.agent, plan.from_version, plan.migration) == (v3, "1", v3.migrations["1"])
    assert plan.migration_name.endswith("<lambda>")
    # else nothing: the step is left for a worker that has the code
    assert registry.resolve(name, "0") is None
    assert registry.resolve(unique("absent"), "1") is None
    # and what a worker subscribes to and advertises: what it runs or migrates from
    assert [pair for pair in registry.handled() if pair[0] == name] == [
        (name, "1"),
        (name, "2"),
        (name, "3"),
    ]
