"""Bearer API keys: every /v1 request is authenticated and scoped to one tenant."""

from __future__ import annotations

from flask import g, request

from app.errors import Unauthorized
from app.store import db, tenants


def authenticate() -> str:
    """Resolve ``Authorization: Bearer <key>`` to a tenant id (stored in ``g.tenant_id``).

    Keys are accepted only in that header: a key in the query string or a cookie, another
    scheme, or an unknown key is a 401 with ``WWW-Authenticate: Bearer``.
    """
    if _credentials_elsewhere():
        raise Unauthorized(
            "API keys are accepted only in the Authorization header, never in the query "
            "string or a cookie."
        )
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


# Query parameters and cookies that carry credentials in other APIs: refused outright,
# so that a key leaked into a URL or a cookie jar never works.
CREDENTIAL_NAMES = frozenset(
    {"access_token", "api_key", "apikey", "api-key", "key", "token", "auth", "authorization"}
)


def _credentials_elsewhere() -> bool:
    for source in (request.args, request.cookies):
        for name, value in source.items(multi=True):
            if name.lower() in CREDENTIAL_NAMES or value.startswith(tenants.API_KEY_PREFIX):
                return True
    return False


def current_tenant() -> str:
    """The authenticated tenant of this request."""
    return g.tenant_id
