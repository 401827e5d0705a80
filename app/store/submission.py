"""Submitting a task: one transaction (DESIGN.md, mechanism 2) with Idempotency-Key.

In a single transaction: claim the idempotency key (``INSERT … ON CONFLICT``, unique per
tenant), insert the task and its ``task.created`` event (:func:`app.store.lifecycle.create`),
and add the outbox row of step 0. :func:`app.store.db.transaction` publishes the step right
after the commit; when the broker is down the row stays for the beat's relay, so the
answer is still ``202``.

Concurrent requests with one key: the second ``INSERT`` waits on the first's
uncommitted row (PostgreSQL's unique-index wait), then sees the committed key and
replays it. A wait longer than :data:`IN_FLIGHT_WAIT_SECONDS` (``lock_timeout``) answers
``409 idempotency_key_in_flight``; if the first transaction rolls back, the waiter's
insert simply succeeds. An expired key (``expires_at`` passed, not yet deleted by the
expiry sweep) is taken over in the same statement, so it never replays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.engine import RowMapping

from app import settings as settings_mod
from app.errors import IdempotencyKeyInFlight, IdempotencyKeyReused, InvalidIdempotencyKey
from app.store import budgets, db, db_errors, lifecycle

MAX_KEY_LENGTH = 255
# How long a request waits for a concurrent one with the same key to commit.
IN_FLIGHT_WAIT_SECONDS = 3


@dataclass(frozen=True)
class Submitted:
    """The task (its current row) and whether it was an idempotent replay."""

    task: RowMapping
    replayed: bool


def check_idempotency_key(value: str | None) -> str | None:
    """The header's value, or ``None`` when absent; 1 to 255 printable ASCII characters
    (``400 invalid_idempotency_key`` otherwise)."""
    if value is None:
        return None
    if not value:
        raise InvalidIdempotencyKey("The Idempotency-Key header must not be empty.")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"The Idempotency-Key header must be at most {MAX_KEY_LENGTH} characters."
        )
    if not all(" " <= ch <= "~" for ch in value):
        raise InvalidIdempotencyKey(
            "The Idempotency-Key header must contain only printable ASCII characters."
        )
    return value


def _canonical(value: Any) -> Any:
    # 1 and 1.0 are the same JSON number; parsed bodies are compared as JSON.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def fingerprint(body: Any) -> str:
    """sha256 of the canonical JSON of a parsed request body (key order irrelevant)."""
    canonical = json.dumps(
        _canonical(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_CLAIM_KEY = sa.text(
    # One round trip: psycopg2 sends both statements as one query string, and the
    # result is the INSERT's.
    f"SET LOCAL lock_timeout = '{IN_FLIGHT_WAIT_SECONDS}s'; "
    "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, expires_at) "
    "VALUES (:tenant_id, :key, :fingerprint, now() + make_interval(secs => :ttl)) "
    "ON CONFLICT (tenant_id, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
    "task_id = NULL, created_at = now(), expires_at = EXCLUDED.expires_at "
    # Take over only a forgotten key: expired, or its task purged.
    "WHERE idempotency_keys.expires_at <= now() OR idempotency_keys.task_id IS NULL "
    "RETURNING key"
)


# Run with the outbox row's INSERT (a data-modifying CTE runs exactly once, read or not).
_KEY_NAMES_TASK = (
    "UPDATE idempotency_keys SET task_id = :task_id "
    "WHERE tenant_id = :idem_tenant AND key = :idem_key"
)


def submit(
    tenant_id: str,
    task: Mapping[str, Any],
    *,
    body: Any,
    idempotency_key: str | None,
    parent_id: str | None = None,
    spawn_key: str | None = None,
    conn: sa.Connection | None = None,
) -> Submitted:
    """Create the task described by ``task`` (validated request fields), or replay the
    one ``idempotency_key`` already created for the same ``body``.

    A child task (``ctx.spawn``, V2.md 6) passes its ``parent_id`` and ``spawn_key``, and
    the ``conn`` of the spawn's transaction (from :func:`app.store.db.transaction`), in
    which the parent was checked: it is created like any submission, in that transaction.

    Raises :class:`IdempotencyKeyReused` (same key, different body) and
    :class:`IdempotencyKeyInFlight` (the first request has not committed in time).
    """
    ttl = settings_mod.current().idempotency_ttl_seconds
    outer = conn
    try:
        with contextlib.nullcontext(outer) if outer is not None else db.transaction() as conn:
            if idempotency_key is not None:
                claimed = conn.execute(
                    _CLAIM_KEY,
                    {
                        "tenant_id": tenant_id,
                        "key": idempotency_key,
                        "fingerprint": fingerprint(body),
                        "ttl": ttl,
                    },
                ).scalar()
                if claimed is None:
                    return _replay(conn, tenant_id, idempotency_key, fingerprint(body))
            row = lifecycle.create(
                conn,
                tenant_id=tenant_id,
                agent=task["agent"],
                input=task["input"],
                metadata=task["metadata"],
                webhook_url=task.get("webhook_url"),
                timeout_seconds=task.get("timeout_seconds"),
                idempotency_key=idempotency_key,
                budget=budgets.normalized(task.get("budget")),
                # The version this process registers (the API pinned it when validating).
                agent_version=task.get("agent_version", "1"),
                parent_id=parent_id,
                spawn_key=spawn_key,
                # Step 0's outbox row, the task.created event and the key naming its
                # task: one round trip.
                dispatch=True,
                also=[_KEY_NAMES_TASK] if idempotency_key is not None else [],
                also_params={"idem_tenant": tenant_id, "idem_key": idempotency_key},
            )
    except sa_exc.OperationalError as exc:
        if db_errors.sqlstate(exc) == db_errors.LOCK_NOT_AVAILABLE:
            raise IdempotencyKeyInFlight() from None
        raise
    return Submitted(row, replayed=False)


def _replay(conn: sa.Connection, tenant_id: str, key: str, body_fingerprint: str) -> Submitted:
    stored = conn.execute(
        sa.text(
            "SELECT fingerprint, task_id FROM idempotency_keys "
            "WHERE tenant_id = :tenant_id AND key = :key"
        ),
        {"tenant_id": tenant_id, "key": key},
    ).one_or_none()
    if stored is None:  # deleted by the expiry sweep between our two statements
        raise IdempotencyKeyInFlight()
    if stored.fingerprint != body_fingerprint:
        raise IdempotencyKeyReused()
    task = lifecycle.get(conn, stored.task_id, tenant_id)
    if task is None:  # cannot happen: the claim takes over keys whose task is gone
        raise RuntimeError(f"idempotency key {key!r} names a missing task")
    return Submitted(task, replayed=True)
