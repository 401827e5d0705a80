"""A tenant's webhook signing secrets: the current one, and rotated-out ones still valid."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.store import tenants

# A rotated-out secret keeps signing alongside the new one for this long.
ROTATION_GRACE_SECONDS = 24 * 3600


def active_secrets(conn: Connection, tenant_id: str) -> list[str]:
    """The tenant's signing secrets, current first, then rotated-out ones still valid."""
    return list(
        conn.execute(
            sa.text(
                "SELECT secret FROM webhook_secrets WHERE tenant_id = :t "
                "AND (expires_at IS NULL OR expires_at > now()) "
                "ORDER BY expires_at IS NOT NULL, created_at DESC, id DESC"
            ),
            {"t": tenant_id},
        ).scalars()
    )


def rotate_secret(conn: Connection, tenant_id: str) -> str:
    """Make a new current secret; the previous one keeps signing for 24 hours."""
    # Serialise rotations of one tenant so that exactly one secret is current.
    conn.execute(sa.text("SELECT id FROM tenants WHERE id = :t FOR UPDATE"), {"t": tenant_id})
    conn.execute(
        sa.text(
            "DELETE FROM webhook_secrets WHERE tenant_id = :t "
            "AND expires_at IS NOT NULL AND expires_at <= now()"
        ),
        {"t": tenant_id},
    )
    conn.execute(
        sa.text(
            "UPDATE webhook_secrets SET expires_at = now() + make_interval(secs => :grace) "
            "WHERE tenant_id = :t AND expires_at IS NULL"
        ),
        {"t": tenant_id, "grace": ROTATION_GRACE_SECONDS},
    )
    secret = tenants.new_webhook_secret()
    conn.execute(
        sa.text("INSERT INTO webhook_secrets (tenant_id, secret) VALUES (:t, :s)"),
        {"t": tenant_id, "s": secret},
    )
    return secret
