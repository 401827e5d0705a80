"""Bearer API keys: every /v1 request is authenticated and scoped to one tenant."""

from __future__ import annotations

from flask import g, request

from app import db, tenants
from app.errors import Unauthorized


def authenticate() -> str:
    """Resolve ``Authorization: Bearer <key>`` to a tenant id (stored in ``g.tenant_id``).

    Keys are accepted only in that header: a key in the query string or a cookie, another
    scheme, or an unknown key is a 401 with ``WWW-Authenticate: Bearer``.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized()
    with db.engine().connect() as conn:
        tenant_id = tenants.tenant_for_api_key(conn, key)
    if tenant_id is None:
        raise Unauthorized("The API key is not valid.")
    g.tenant_id = tenant_id
    return tenant_id


def current_tenant() -> str:
    """The authenticated tenant of this request."""
    return g.tenant_id
