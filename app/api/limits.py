"""Limits that keep one client from hurting the others (V2.md section 8), shared by every
web process through Redis.

- **Rate limit per API key**: ``OUTLAST_RATE_LIMIT_PER_SECOND`` (``r``) with a burst of
  ``2r``, as a moving window of ``2r`` requests in any 2 seconds (the ``limits``
  library's moving-window strategy over its Redis storage): a key idle for two seconds
  may send ``2r`` at once, and sustains ``r`` per second. Past it: ``429 rate_limited``
  with ``Retry-After``. Every ``/v1`` answer carries the IETF httpapi rate-limit-headers
  draft's fields (draft-ietf-httpapi-ratelimit-headers-08 and later, Structured Fields)::

      RateLimit-Policy: "per-key";q=200;w=2
      RateLimit: "per-key";r=173;t=1

- **Waiters per tenant**: at most ``OUTLAST_MAX_WAITERS_PER_TENANT`` ``?wait=`` long
  polls and SSE streams at once per tenant, counted across every web process: a Redis
  sorted set per tenant whose members are the waiters and whose scores are their lease
  expiries (a waiter renews its lease while it waits, so the slots of a web process
  that died are free again within :data:`WAITER_LEASE_SECONDS`).

Redis unreachable: both limits let requests through (and say so in the log) rather than
refuse work, as submission goes on while the broker is down (API.md); a failure is not
retried for :data:`REDIS_RETRY_SECONDS`, so an outage costs a request no time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from app import settings as settings_mod
from app.errors import RateLimited

log = logging.getLogger(__name__)

POLICY_NAME = "per-key"
BURST_WINDOW_SECONDS = 2  # "burst twice that": 2r requests in any 2 s window
WAITER_LEASE_SECONDS = 60.0
WAITER_RENEW_SECONDS = 15.0  # a waiter renews its slot at least this often
WAITER_RETRY_AFTER_SECONDS = 2
REDIS_TIMEOUT_SECONDS = 0.5
REDIS_RETRY_SECONDS = 5.0
KEY_PREFIX = "outlast:limits"


# --- Redis -----------------------------------------------------------------------------------


class _Redis:
    """This process's limits storage and plain client for the configured REDIS_URL, with
    a short pause after a failure (an outage must not slow every request down)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[int, str] | None = None
        self._storage: Any = None
        self._down_until: dict[str, float] = {}  # per URL: a new REDIS_URL is tried at once

    def storage(self) -> Any | None:
        """The ``limits`` Redis storage, or ``None`` while Redis is considered down."""
        url = settings_mod.current().redis_url
        if not url or time.monotonic() < self._down_until.get(url, 0.0):
            return None
        key = (os.getpid(), url)
        if self._key != key:
            with self._lock:
                if self._key != key:
                    from limits.storage import RedisStorage

                    self._storage = RedisStorage(
                        url,
                        key_prefix=KEY_PREFIX,
                        socket_timeout=REDIS_TIMEOUT_SECONDS,
                        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                        health_check_interval=30,
                    )
                    self._key = key
        return self._storage

    def client(self) -> Any | None:
        storage = self.storage()
        return None if storage is None else storage.get_connection()

    def failed(self, what: str, exc: BaseException) -> None:
        url = settings_mod.current().redis_url or ""
        self._down_until[url] = time.monotonic() + REDIS_RETRY_SECONDS
        log.warning("%s not enforced (Redis unreachable): %s", what, exc)


_redis = _Redis()


# --- rate limit per API key --------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimitState:
    """What one request's rate-limit check found, for the answer's headers."""

    quota: int
    remaining: int
    reset_seconds: int


def policy_header(settings: settings_mod.Settings) -> str | None:
    """``RateLimit-Policy``: the quota ``q`` per window ``w`` seconds; ``None`` when off."""
    if settings.rate_limit_per_second <= 0:
        return None
    quota = settings.rate_limit_per_second * BURST_WINDOW_SECONDS
    return f'"{POLICY_NAME}";q={quota};w={BURST_WINDOW_SECONDS}'


def state_header(state: RateLimitState) -> str:
    """``RateLimit``: what is left ``r`` and the seconds ``t`` until more is available."""
    return f'"{POLICY_NAME}";r={state.remaining};t={state.reset_seconds}'


def _key_id(api_key: str) -> str:
    # Never the key itself in Redis: a digest names its bucket.
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def check_rate(api_key: str) -> RateLimitState | None:
    """Count one request of ``api_key``; raise :class:`RateLimited` past the limit.

    ``None`` when rate limiting is off or Redis cannot be reached (the request goes on).
    """
    settings = settings_mod.current()
    if settings.rate_limit_per_second <= 0:
        return None
    storage = _redis.storage()
    if storage is None:
        return None
    from limits import RateLimitItemPerSecond
    from limits.strategies import MovingWindowRateLimiter

    quota = settings.rate_limit_per_second * BURST_WINDOW_SECONDS
    item = RateLimitItemPerSecond(quota, BURST_WINDOW_SECONDS)
    limiter = MovingWindowRateLimiter(storage)
    identity = _key_id(api_key)
    try:
        allowed = limiter.hit(item, "key", identity)
        stats = limiter.get_window_stats(item, "key", identity)
    except Exception as exc:
        _redis.failed("rate limit", exc)
        return None
    reset = max(0, math.ceil(stats.reset_time - time.time()))
    state = RateLimitState(quota=quota, remaining=max(0, stats.remaining), reset_seconds=reset)
    if not allowed:
        raise RateLimited(
            f"More than {settings.rate_limit_per_second} requests per second (burst "
            f"{quota}) with this API key; retry after Retry-After seconds.",
            headers={"Retry-After": str(max(1, reset)), "RateLimit": state_header(state)},
        )
    return state


# --- waiters per tenant ----------------------------------------------------------------------

# Atomically: drop expired slots, then take one if fewer than the cap are held.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def _waiters_key(tenant_id: str) -> str:
    return f"{KEY_PREFIX}:waiters:{tenant_id}"


class WaiterSlot:
    """One of the tenant's waiter slots, held until :meth:`release` (idempotent)."""

    def __init__(self, tenant_id: str, member: str | None):
        self.tenant_id = tenant_id
        self._member = member  # None: not counted (Redis was unreachable)
        self._renewed = time.monotonic()
        self._released = False

    def renew(self) -> None:
        """Extend the lease if it is due (call it while waiting; cheap otherwise)."""
        if self._member is None or self._released:
            return
        if time.monotonic() - self._renewed < WAITER_RENEW_SECONDS:
            return
        self._renewed = time.monotonic()
        client = _redis.client()
        if client is None:
            return
        try:
            client.zadd(
                _waiters_key(self.tenant_id),
                {self._member: time.time() + WAITER_LEASE_SECONDS},
                xx=True,
            )
        except Exception as exc:
            _redis.failed("waiter cap", exc)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._member is None:
            return
        client = _redis.client()
        if client is None:
            return
        try:
            client.zrem(_waiters_key(self.tenant_id), self._member)
        except Exception as exc:
            _redis.failed("waiter cap", exc)


def acquire_waiter(tenant_id: str) -> WaiterSlot:
    """Take one of ``tenant_id``'s waiter slots; raise :class:`RateLimited` when all
    ``OUTLAST_MAX_WAITERS_PER_TENANT`` are held (in any web process)."""
    cap = settings_mod.current().max_waiters_per_tenant
    client = _redis.client()
    if client is None:
        return WaiterSlot(tenant_id, None)
    member = uuid.uuid4().hex
    now = time.time()
    try:
        taken = client.eval(
            _ACQUIRE,
            1,
            _waiters_key(tenant_id),
            now,
            now + WAITER_LEASE_SECONDS,
            cap,
            member,
            int(WAITER_LEASE_SECONDS * 2),
        )
    except Exception as exc:
        _redis.failed("waiter cap", exc)
        return WaiterSlot(tenant_id, None)
    if not taken:
        raise RateLimited(
            f"This tenant already has {cap} long polls and event streams open "
            "(OUTLAST_MAX_WAITERS_PER_TENANT); retry after Retry-After seconds.",
            headers={"Retry-After": str(WAITER_RETRY_AFTER_SECONDS)},
        )
    return WaiterSlot(tenant_id, member)


@contextmanager
def waiter_slot(tenant_id: str) -> Iterator[WaiterSlot]:
    """:func:`acquire_waiter` for the duration of the block."""
    slot = acquire_waiter(tenant_id)
    try:
        yield slot
    finally:
        slot.release()


def waiters_held(tenant_id: str) -> int | None:
    """How many of the tenant's slots are held now (``None``: Redis unreachable)."""
    client = _redis.client()
    if client is None:
        return None
    try:
        key = _waiters_key(tenant_id)
        client.zremrangebyscore(key, "-inf", time.time())
        return int(client.zcard(key))
    except Exception as exc:
        _redis.failed("waiter cap", exc)
        return None
