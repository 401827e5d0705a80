"""Child tasks from inside a step (V2.md section 6): ``ctx.spawn``, ``ctx.wait_for``'s
checkpoint, ``ctx.children``.

A child is committed when ``ctx.spawn`` returns (not with the step's checkpoint), in one
transaction with the parent share-locked and fenced on the step's lease: its id is
then a fact that a re-run of the step finds again (``spawn_key`` ``"<step>:<index>"``,
unique per parent), so the id may be passed to tool calls or kept in state like any
output, and the child starts at once. It is created by the submission code
(:func:`app.store.submission.submit`: ``task.created``, the outbox row of its first
step), with the input checked by the same :func:`app.engine.registry.check_input` as
``POST /v1/tasks``. A child counts for its tenant like any task (``GET /v1/agents``'
``tasks_in_flight``, webhooks); the request rate limit applies to API requests, and a
spawn is not one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from app.engine import registry
from app.store import children as store
from app.store import db, lifecycle, outbox, submission
from app.store.representation import task_json
from outlast.sdk import Cancelled, SpawnRefused, WaitForChildren

MAX_METADATA_KEYS = 32  # as on POST /v1/tasks


class SpawnMismatch(Exception):
    """A re-run of the step asked spawn call ``key`` for another agent or input."""


def spawn(
    *,
    parent_id: str,
    step: int,
    index: int,
    token: str,
    agent_name: str,
    input: Any,
    metadata: Any,
) -> str:
    """Create the child of spawn call ``index`` of step ``step`` (or find the one an
    earlier run of this step created) and return its id.

    Raises :class:`SpawnRefused` (unknown agent, input or metadata refused),
    :class:`Cancelled` (the parent is no longer running this step) or
    :class:`SpawnMismatch`.
    """
    key = store.spawn_key(step, index)
    metadata = {} if metadata is None else metadata
    with db.transaction() as conn:
        parent = store.lock_parent_for_spawn(conn, parent_id, token)
        if parent is None:
            raise Cancelled("the task is no longer running this step")
        existing = store.find_spawned(conn, parent_id, key)
        if existing is not None:
            if existing["agent"] != agent_name or _json(existing["input"]) != _json(input):
                raise SpawnMismatch(
                    f"spawn call {index} of step {step} created a {existing['agent']!r} task "
                    f"with other input than it asks for now; a step must spawn the same "
                    "children in the same order when it is re-run"
                )
            return existing["id"]
        agent = _check(agent_name, input, metadata)
        created = submission.submit(
            parent["tenant_id"],
            {
                "agent": agent.name,
                "input": dict(input),
                "metadata": dict(metadata),
                "agent_version": agent.version,
            },
            body=None,
            idempotency_key=None,
            parent_id=parent_id,
            spawn_key=key,
            conn=conn,
        )
        return created.task["id"]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check(agent_name: Any, input: Any, metadata: Any) -> Any:
    """The child's agent, or :class:`SpawnRefused` with the errors a ``422`` would carry."""
    agent = registry.get_agent(agent_name) if isinstance(agent_name, str) else None
    if agent is None:
        errors = {"agent": [f"Unknown agent {agent_name!r}."]}
        raise SpawnRefused(f"ctx.spawn: unknown agent {agent_name!r}", errors)
    if not isinstance(input, Mapping):
        raise SpawnRefused("ctx.spawn: the input must be an object", {"input": ["Not an object."]})
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA_KEYS:
        errors = {"metadata": [f"Must be an object with at most {MAX_METADATA_KEYS} keys."]}
        raise SpawnRefused("ctx.spawn: metadata refused", errors)
    try:
        json.dumps({"input": input, "metadata": metadata}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SpawnRefused(f"ctx.spawn: input is not JSON: {exc}", {"input": [str(exc)]}) from None
    errors = registry.check_input(agent, dict(input))
    if errors:
        raise SpawnRefused(f"ctx.spawn: agent {agent.name!r} refuses the input: {errors}", errors)
    return agent


def children(parent_id: str, ids: Sequence[str] | None) -> list[dict[str, Any] | None]:
    """The public representations of the parent's children ``ids`` now, in that order
    (``None`` for an id that is not a child, or was deleted); every child in spawn order
    when ``ids`` is ``None``."""
    with db.engine().connect() as conn:
        if ids is None:
            rows = []
            after = None
            while True:
                batch = store.page(conn, parent_id, limit=500, after=after)
                rows.extend(batch)
                if len(batch) < 500:
                    break
                after = (batch[-1]["created_at"], batch[-1]["id"])
            return [task_json(r) for r in rows]
        found = store.by_ids(conn, parent_id, list(ids))
    return [task_json(r) if r is not None else None for r in found]


# --- ctx.wait_for at the checkpoint ----------------------------------------------------------


def wait_problem(parent_id: str, outcome: WaitForChildren) -> str | None:
    """Why ``outcome`` cannot be committed (the task fails with ``invalid_output``)."""
    ids = outcome.ids
    if (
        isinstance(ids, str | bytes)
        or not isinstance(ids, Sequence)
        or not ids
        or not all(isinstance(i, str) for i in ids)
    ):
        return "ctx.wait_for() needs a non-empty list of child task ids"
    if outcome.mode not in store.MODES:
        return f"ctx.wait_for() mode must be 'all' or 'any', not {outcome.mode!r}"
    with db.engine().connect() as conn:
        strangers = store.not_children(conn, parent_id, list(ids))
    if strangers:
        return f"ctx.wait_for(): {strangers[0]!r} is not a child of this task (ctx.spawn)"
    return None


def commit_wait(
    conn: Connection,
    task_id: str,
    step: int,
    token: str,
    outcome: WaitForChildren,
    *,
    started_at: datetime,
    attempt: int,
) -> str:
    """The checkpoint of a step that returned ``ctx.wait_for``: ``waiting`` (no step
    queued: a child's terminal transition or the sweep queues it), ``continued`` (the
    condition already held), or ``discarded`` (the fence failed)."""
    row = lifecycle.commit_step(
        conn,
        task_id,
        step,
        token,
        state=outcome.state,
        started_at=started_at,
        attempt=attempt,
        dispatch=False,
    )
    if row is None:
        return "discarded"
    if store.wait(conn, task_id, list(outcome.ids), outcome.mode):
        outbox.add_step(conn, task_id, step + 1)
        return "continued"
    return "waiting"
