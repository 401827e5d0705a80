"""Tenants, their API keys (stored hashed) and their webhook signing secrets.

An API key is ``olk_`` + 43 random URL-safe characters (256 bits). Only its sha256 is
stored, with its first :data:`PREFIX_LENGTH` characters as a non-secret name for
listings and revocation (``olk_`` + 8 characters: 48 of the 256 bits, so the prefix
alone never authenticates: a key is found by the hash of the whole key only). A key is
valid until it is revoked or its ``expires_at`` passes.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.store import ids

API_KEY_PREFIX = "olk_"
PREFIX_LENGTH = 12  # V2.md 12a: the prefix shown for a key is its first 12 characters


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key (keys are long random strings: one sha256 is enough)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class CreatedTenant:
    tenant_id: str
    name: str
    api_key: str
    webhook_secret: str

    def as_json(self) -> dict[str, str]:
        return {
            "tenant_id": self.tenant_id,
            "name": self.name,
            "api_key": self.api_key,
            "webhook_secret": self.webhook_secret,
        }


class TenantExists(ValueError):
    pass


def create(conn: Connection, name: str) -> CreatedTenant:
    """Create tenant ``name`` with one API key and one webhook secret; the plain key is
    returned here and never again."""
    tenant_id = ids.new_id("ten")
    inserted = conn.execute(
        sa.text(
            "INSERT INTO tenants (id, name) VALUES (:id, :name) "
            "ON CONFLICT (name) DO NOTHING RETURNING id"
        ),
        {"id": tenant_id, "name": name},
    ).scalar()
    if inserted is None:
        raise TenantExists(f"a tenant named {name!r} already exists")
    api_key = issue_api_key(conn, tenant_id)
    secret = new_webhook_secret()
    conn.execute(
        sa.text("INSERT INTO webhook_secrets (tenant_id, secret) VALUES (:t, :s)"),
        {"t": tenant_id, "s": secret},
    )
    return CreatedTenant(tenant_id, name, api_key, secret)


@dataclass(frozen=True)
class IssuedKey:
    """A key just issued: the plain key exists only in this object."""

    api_key: str
    prefix: str
    expires_at: datetime | None


def issue_key(conn: Connection, tenant_id: str, expires_in: timedelta | None = None) -> IssuedKey:
    """A new API key for an existing tenant, valid for ``expires_in`` (``None``: until
    revoked). The plain key is returned here and never again."""
    api_key = new_api_key()
    expires_at = conn.execute(
        sa.text(
            "INSERT INTO api_keys (id, tenant_id, key_hash, key_prefix, expires_at) "
            "VALUES (:id, :tenant_id, :hash, :prefix, "
            "now() + CAST(:seconds AS double precision) * interval '1 second') "
            "RETURNING expires_at"
        ),
        {
            "id": ids.new_id("key"),
            "tenant_id": tenant_id,
            "hash": hash_api_key(api_key),
            "prefix": api_key[:PREFIX_LENGTH],
            "seconds": None if expires_in is None else expires_in.total_seconds(),
        },
    ).scalar()
    return IssuedKey(api_key, api_key[:PREFIX_LENGTH], expires_at)


def issue_api_key(conn: Connection, tenant_id: str) -> str:
    """A new API key (no expiry) for an existing tenant; returns the plain key."""
    return issue_key(conn, tenant_id).api_key


def find_by_name(conn: Connection, name: str) -> str | None:
    return conn.execute(
        sa.text("SELECT id FROM tenants WHERE name = :name"), {"name": name}
    ).scalar()


@dataclass(frozen=True)
class KeyGrant:
    """What a valid key grants: its tenant, and the key's id and expiry (a caller that
    caches grants checks ``expires_at`` on every use)."""

    tenant_id: str
    key_id: str
    expires_at: datetime | None


def grant_for_api_key(conn: Connection, api_key: str) -> KeyGrant | None:
    """The grant of ``api_key``, or ``None`` when it is unknown, revoked or expired."""
    row = conn.execute(
        sa.text(
            "SELECT tenant_id, id, expires_at FROM api_keys WHERE key_hash = :hash "
            "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
        ),
        {"hash": hash_api_key(api_key)},
    ).one_or_none()
    return None if row is None else KeyGrant(row.tenant_id, row.id, row.expires_at)


def tenant_for_api_key(conn: Connection, api_key: str) -> str | None:
    """The tenant id that ``api_key`` belongs to, or ``None`` (unknown, revoked or expired)."""
    grant = grant_for_api_key(conn, api_key)
    return None if grant is None else grant.tenant_id


def note_keys_used(conn: Connection, key_ids: Iterable[str], min_interval_seconds: float) -> int:
    """Set ``last_used_at`` to now for ``key_ids``, skipping keys written less than
    ``min_interval_seconds`` ago (by any process); returns how many rows changed."""
    ids_ = sorted(set(key_ids))
    if not ids_:
        return 0
    return conn.execute(
        sa.text(
            "UPDATE api_keys SET last_used_at = now() WHERE id = ANY(:ids) "
            "AND (last_used_at IS NULL "
            "     OR last_used_at < now() - make_interval(secs => :interval))"
        ),
        {"ids": ids_, "interval": min_interval_seconds},
    ).rowcount


@dataclass(frozen=True)
class KeyInfo:
    """One key as ``outlast tenants keys`` lists it: never the key, only its prefix."""

    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


_KEY_INFO = "key_prefix AS prefix, created_at, last_used_at, expires_at, revoked_at"


def list_keys(conn: Connection, tenant_id: str) -> list[KeyInfo]:
    """The tenant's keys, oldest first (revoked and expired ones included)."""
    rows = conn.execute(
        sa.text(f"SELECT {_KEY_INFO} FROM api_keys WHERE tenant_id = :t ORDER BY created_at, id"),
        {"t": tenant_id},
    ).mappings()
    return [KeyInfo(**row) for row in rows]


class KeyNotFound(LookupError):
    pass


def revoke_key(conn: Connection, prefix: str) -> KeyInfo:
    """Revoke the key whose prefix is ``prefix`` (a key already revoked keeps its first
    ``revoked_at``). Raises :class:`KeyNotFound` when no key, or more than one, has it."""
    rows = conn.execute(
        sa.text("SELECT id FROM api_keys WHERE key_prefix = :p FOR UPDATE"), {"p": prefix}
    ).all()
    if not rows:
        raise KeyNotFound(f"no API key has the prefix {prefix!r}")
    if len(rows) > 1:
        raise KeyNotFound(f"{len(rows)} API keys have the prefix {prefix!r}; nothing was revoked")
    row = (
        conn.execute(
            sa.text(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = :id "
                f"RETURNING {_KEY_INFO}"
            ),
            {"id": rows[0].id},
        )
        .mappings()
        .one()
    )
    return KeyInfo(**row)
