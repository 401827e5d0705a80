"""Agents that spawn child tasks, for tests/engine/test_children.py (``OUTLAST_AGENTS``)."""

from __future__ import annotations

import threading
from typing import Any

from app.engine.context import StepContext
from outlast import RetryableError, SpawnRefused, agent

ANY_INPUT = {"type": "object"}

# Runs of a task's first step (in-process workers share this with the test).
_runs: dict[str, int] = {}
_lock = threading.Lock()


def _run_number(ctx: StepContext) -> int:
    with _lock:
        _runs[ctx.task_id] = _runs.get(ctx.task_id, 0) + 1
        return _runs[ctx.task_id]


@agent("test_spawn_rerun", input_schema=ANY_INPUT)
def spawn_rerun(ctx: StepContext, state: Any):
    """Spawns two echo children, then raises a transient error the first time: the
    re-run of the step must find the same two children."""
    if state is None:
        ids = [ctx.spawn("echo", {"message": m}) for m in ("a", "b")]
        if _run_number(ctx) == 1:
            raise RetryableError("the first run of the spawning step fails after spawning")
        return ctx.wait_for(ids, "all", {"ids": ids})
    found = ctx.children()
    return ctx.done({"ids": state["ids"], "all": [c["id"] for c in found]})


@agent("test_spawn_changes", input_schema=ANY_INPUT)
def spawn_changes(ctx: StepContext, state: Any):
    """Spawns a child whose input differs on the re-run (a nondeterministic step)."""
    run = _run_number(ctx)
    ctx.spawn("echo", {"message": f"run {run}"})
    if run == 1:
        raise RetryableError("fail once after spawning")
    return ctx.done({"run": run})


@agent("test_spawn_refused", input_schema=ANY_INPUT)
def spawn_refused(ctx: StepContext, state: Any):
    """Spawns children that their agent refuses, and reports how."""
    refused = {}
    for name, child_input in (("echo", {"steps": 0}), ("no_such_agent", {})):
        try:
            ctx.spawn(name, child_input)
        except SpawnRefused as exc:
            refused[name] = exc.errors
    return ctx.done({"refused": refused, "children": ctx.children()})


@agent("test_wait_for_stranger", input_schema=ANY_INPUT)
def wait_for_stranger(ctx: StepContext, state: Any):
    """Waits for a task that is not its child."""
    return ctx.wait_for([ctx.input["other"]])


@agent("test_wait_after_done", input_schema=ANY_INPUT)
def wait_after_done(ctx: StepContext, state: Any):
    """Spawns a quick child and waits for it inside the step, so that the condition
    already holds when the step's checkpoint records the wait."""
    if state is None:
        child = ctx.spawn("echo", {"message": "quick"})
        for _ in range(200):
            if ctx.children([child])[0]["status"] == "completed":
                break
            ctx.wait(0.05)
        return ctx.wait_for([child], "all", {"child": child})
    return ctx.done({"child": ctx.children([state["child"]])[0]["result"]})
