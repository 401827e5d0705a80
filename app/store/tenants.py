"""Tenants, their API keys (stored hashed) and their webhook signing secrets."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.store import ids

API_KEY_PREFIX = "olk_"


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


def issue_api_key(conn: Connection, tenant_id: str) -> str:
    """A new API key for an existing tenant; returns the plain key."""
    api_key = new_api_key()
    conn.execute(
        sa.text(
            "INSERT INTO api_keys (id, tenant_id, key_hash, key_prefix) "
            "VALUES (:id, :tenant_id, :hash, :prefix)"
        ),
        {
            "id": ids.new_id("key"),
            "tenant_id": tenant_id,
            "hash": hash_api_key(api_key),
            "prefix": api_key[:10],
        },
    )
    return api_key


def find_by_name(conn: Connection, name: str) -> str | None:
    return conn.execute(
        sa.text("SELECT id FROM tenants WHERE name = :name"), {"name": name}
    ).scalar()


def tenant_for_api_key(conn: Connection, api_key: str) -> str | None:
    """The tenant id that ``api_key`` belongs to, or ``None`` (unknown or revoked)."""
    return conn.execute(
        sa.text("SELECT tenant_id FROM api_keys WHERE key_hash = :hash AND revoked_at IS NULL"),
        {"hash": hash_api_key(api_key)},
    ).scalar()
