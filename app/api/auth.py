"""Bearer API keys: every /v1 request is authenticated and scoped to one tenant.

Each web process keeps what it looked up for at most :data:`KEY_CACHE_SECONDS`, so a
revoked key is refused by every web process within that bound (V2.md 12a asks for 5
seconds); an expired key is refused from its ``expires_at`` on, cached or not.
``last_used_at`` is written at most once per key per :data:`LAST_USED_INTERVAL_SECONDS`
per process (and skipped when another process wrote it within that interval), never
once per request.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from flask import g, request

from app.errors import Unauthorized
from app.store import db, tenants

log = logging.getLogger(__name__)

# How long a web process trusts a key it looked up: the revocation bound.
KEY_CACHE_SECONDS = 2.0
# More keys than this in one process's cache and it starts over (a bound on memory).
KEY_CACHE_MAX_ENTRIES = 10_000
# last_used_at is a day-to-day fact ("is this key still used?"), not an audit log.
LAST_USED_INTERVAL_SECONDS = 60.0


class _KeyCache:
    """Grants by key hash, each kept for ``ttl`` seconds (monotonic clock)."""

    def __init__(self, ttl: float, max_entries: int):
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._grants: dict[str, tuple[float, tenants.KeyGrant]] = {}
        self._written: dict[str, float] = {}  # key id -> when this process wrote last use

    def get(self, key_hash: str) -> tenants.KeyGrant | None:
        entry = self._grants.get(key_hash)
        if entry is None or time.monotonic() - entry[0] >= self.ttl:
            return None
        return entry[1]

    def put(self, key_hash: str, grant: tenants.KeyGrant, looked_up_at: float) -> None:
        """Keep ``grant`` until ``ttl`` after ``looked_up_at``: when the look-up *began*,
        so that a revocation committed during a slow look-up still counts from its commit."""
        with self._lock:
            if len(self._grants) >= self.max_entries:
                self._grants.clear()
            self._grants[key_hash] = (looked_up_at, grant)

    def forget(self, key_hash: str) -> None:
        self._grants.pop(key_hash, None)

    def last_use_due(self, key_id: str, interval: float) -> bool:
        """Whether this process should write ``key_id``'s last use now (and note it)."""
        now = time.monotonic()
        with self._lock:
            written = self._written.get(key_id)
            if written is not None and now - written < interval:
                return False
            if len(self._written) >= self.max_entries:
                self._written.clear()
            self._written[key_id] = now
            return True

    def clear(self) -> None:
        with self._lock:
            self._grants.clear()
            self._written.clear()


_cache = _KeyCache(KEY_CACHE_SECONDS, KEY_CACHE_MAX_ENTRIES)


def authenticate() -> str:
    """Resolve ``Authorization: Bearer <key>`` to a tenant id (stored in ``g.tenant_id``).

    Keys are accepted only in that header: a key in the query string or a cookie, another
    scheme, or an unknown, revoked or expired key is a 401 with ``WWW-Authenticate:
    Bearer``.
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
    grant = _grant(key)
    if grant is None:
        raise Unauthorized("The API key is not valid.")
    _note_use(grant)
    g.tenant_id = grant.tenant_id
    return grant.tenant_id


def _grant(key: str) -> tenants.KeyGrant | None:
    key_hash = tenants.hash_api_key(key)
    grant = _cache.get(key_hash)
    if grant is None:
        looked_up_at = time.monotonic()
        with db.engine().connect() as conn:
            grant = tenants.grant_for_api_key(conn, key)
        if grant is None:
            return None  # unknown keys are not cached: a new key works at once
        _cache.put(key_hash, grant, looked_up_at)
    if grant.expires_at is not None and grant.expires_at <= datetime.now(UTC):
        _cache.forget(key_hash)
        return None
    return grant


def _note_use(grant: tenants.KeyGrant) -> None:
    if not _cache.last_use_due(grant.key_id, LAST_USED_INTERVAL_SECONDS):
        return
    try:
        with db.transaction() as conn:
            tenants.note_keys_used(conn, [grant.key_id], LAST_USED_INTERVAL_SECONDS)
    except Exception as exc:  # a lost last-use write never fails the request
        log.warning("last_used_at of an API key not recorded: %s", exc)


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
