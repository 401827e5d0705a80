"""One typed settings object, built from the environment once at start-up.

Nothing else in Outlast reads ``os.environ``: processes call :func:`current`, tests
build a :class:`Settings` with :meth:`Settings.from_env` over a dict of their own.
The defaults are the table in spec/RUNTIME.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """An environment variable has a value Outlast cannot use; the message says which."""


def database_url_for_sqlalchemy(url: str) -> str:
    """Rewrite a Heroku-style ``postgres://`` URL to name the psycopg2 driver explicitly."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SettingsError(f"DATABASE_URL is not a URL: {url!r}")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        return f"postgresql+psycopg2://{rest}"
    raise SettingsError(f"DATABASE_URL must be a postgres:// or postgresql:// URL, not {scheme}://")


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 0 or 1, got {raw!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of RUNTIME.md's configuration table, typed, with its default."""

    database_url: str | None = None  # SQLAlchemy form (postgresql+psycopg2://); None = embedded
    redis_url: str | None = None  # None = embedded
    port: int = 8000
    lease_seconds: float = 30.0
    reaper_interval_seconds: float = 10.0
    max_attempts: int = 5
    step_retries: int = 3
    step_retry_base_seconds: float = 1.0  # first step-retry backoff; doubles each retry
    idempotency_ttl_seconds: int = 86400
    webhook_retry_base_seconds: float = 5.0
    webhook_max_attempts: int = 15
    webhook_timeout_seconds: float = 10.0
    webhook_sweep_seconds: float = 5.0
    webhook_concurrency_per_tenant: int = 4  # V2.md 8: webhook sends in flight per tenant
    webhook_allow_private: bool = False
    tools_deny_private: bool = False  # OUTLAST_TOOLS_DENY_PRIVATE: SSRF guard on agent tools
    tools_trust_env: bool = False  # OUTLAST_TOOLS_TRUST_ENV: agent tools honour *_PROXY, netrc
    max_body_bytes: int = 1048576
    max_checkpoint_bytes: int = 8 * 1048576  # a step's state or result, as JSON
    task_retention_days: int = 30  # after acknowledged_at (V2.md 4)
    unacked_retention_days: int = 0  # after finished_at, unacknowledged; 0 = kept
    # V2.md 8 and 11: limits that keep one client from hurting the others.
    rate_limit_per_second: int = 100  # per API key, burst twice that; 0 = off
    max_waiters_per_tenant: int = 100  # ?wait= long polls + SSE streams, across web processes
    sse_max_seconds: float = 300.0  # an SSE stream ends after this; the client resumes it
    agents: tuple[str, ...] = ()
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str | None = None
    flower_basic_auth: str | None = None
    log_level: str = "INFO"
    # "json" (one object per line), "console" (short lines for a person; "text" is its old
    # name) or "auto": console when stdout is a terminal, else json.
    log_format: str = "auto"
    # Process sizing (not in RUNTIME.md's table; Heroku's WEB_CONCURRENCY convention).
    bind_host: str = "0.0.0.0"
    web_concurrency: int = 2
    web_threads: int = 16  # gthread only
    # gevent: a waiting request (long poll, SSE) is a greenlet, not a thread (docs/benchmarks.md).
    web_worker_class: str = "gevent"
    web_worker_connections: int = 2000  # gevent: concurrent requests per web worker process
    worker_concurrency: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        db = env.get("DATABASE_URL", "").strip() or None
        redis_url = env.get("REDIS_URL", "").strip() or None
        if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError("REDIS_URL must be a redis://, rediss:// or unix:// URL")
        log_format = env.get("OUTLAST_LOG_FORMAT", "auto").strip().lower() or "auto"
        log_format = "console" if log_format == "text" else log_format
        if log_format not in ("auto", "json", "console"):
            raise SettingsError("OUTLAST_LOG_FORMAT must be auto, json or console")
        web_worker_class = env.get("OUTLAST_WEB_WORKER_CLASS", "").strip().lower() or "gevent"
        if web_worker_class not in ("gevent", "gthread"):
            raise SettingsError("OUTLAST_WEB_WORKER_CLASS must be gevent or gthread")
        return cls(
            database_url=database_url_for_sqlalchemy(db) if db else None,
            redis_url=redis_url,
            port=_int(env, "PORT", 8000, 1, 65535),
            lease_seconds=_float(env, "OUTLAST_LEASE_SECONDS", 30.0, 0.5, 86400),
            reaper_interval_seconds=_float(env, "OUTLAST_REAPER_INTERVAL_SECONDS", 10.0, 0.1, 3600),
            max_attempts=_int(env, "OUTLAST_MAX_ATTEMPTS", 5, 1, 1000),
            step_retries=_int(env, "OUTLAST_STEP_RETRIES", 3, 0, 100),
            step_retry_base_seconds=_float(env, "OUTLAST_STEP_RETRY_BASE_SECONDS", 1.0, 0.01, 3600),
            idempotency_ttl_seconds=_int(env, "OUTLAST_IDEMPOTENCY_TTL_SECONDS", 86400, 1, 10**8),
            webhook_retry_base_seconds=_float(
                env, "OUTLAST_WEBHOOK_RETRY_BASE_SECONDS", 5.0, 0.01, 3600
            ),
            webhook_max_attempts=_int(env, "OUTLAST_WEBHOOK_MAX_ATTEMPTS", 15, 1, 1000),
            webhook_timeout_seconds=_float(env, "OUTLAST_WEBHOOK_TIMEOUT_SECONDS", 10.0, 0.1, 600),
            webhook_sweep_seconds=_float(env, "OUTLAST_WEBHOOK_SWEEP_SECONDS", 5.0, 0.1, 3600),
            webhook_concurrency_per_tenant=_int(
                env, "OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT", 4, 1, 10000
            ),
            webhook_allow_private=_bool(env, "OUTLAST_WEBHOOK_ALLOW_PRIVATE", False),
            tools_deny_private=_bool(env, "OUTLAST_TOOLS_DENY_PRIVATE", False),
            tools_trust_env=_bool(env, "OUTLAST_TOOLS_TRUST_ENV", False),
            max_body_bytes=_int(env, "OUTLAST_MAX_BODY_BYTES", 1048576, 1, 1 << 31),
            max_checkpoint_bytes=_int(
                env, "OUTLAST_MAX_CHECKPOINT_BYTES", 8 * 1048576, 1024, 256 * 1048576
            ),
            task_retention_days=_int(env, "OUTLAST_TASK_RETENTION_DAYS", 30, 1, 100000),
            unacked_retention_days=_int(env, "OUTLAST_UNACKED_RETENTION_DAYS", 0, 0, 100000),
            rate_limit_per_second=_int(env, "OUTLAST_RATE_LIMIT_PER_SECOND", 100, 0, 10**6),
            max_waiters_per_tenant=_int(env, "OUTLAST_MAX_WAITERS_PER_TENANT", 100, 1, 10**6),
            sse_max_seconds=_float(env, "OUTLAST_SSE_MAX_SECONDS", 300.0, 0.1, 86400),
            agents=tuple(m.strip() for m in env.get("OUTLAST_AGENTS", "").split(",") if m.strip()),
            llm_base_url=env.get("OUTLAST_LLM_BASE_URL", "").strip() or None,
            llm_api_key=env.get("OUTLAST_LLM_API_KEY", "").strip() or None,
            llm_model=env.get("OUTLAST_LLM_MODEL", "").strip() or None,
            flower_basic_auth=env.get("OUTLAST_FLOWER_BASIC_AUTH", "").strip() or None,
            log_level=env.get("OUTLAST_LOG_LEVEL", "INFO").strip().upper() or "INFO",
            log_format=log_format,
            bind_host=env.get("OUTLAST_BIND_HOST", "").strip() or "0.0.0.0",
            web_concurrency=_int(env, "WEB_CONCURRENCY", 2, 1, 256),
            web_threads=_int(env, "OUTLAST_WEB_THREADS", 16, 1, 1024),
            web_worker_class=web_worker_class,
            web_worker_connections=_int(env, "OUTLAST_WEB_WORKER_CONNECTIONS", 2000, 1, 100000),
            worker_concurrency=_int(env, "OUTLAST_WORKER_CONCURRENCY", os.cpu_count() or 2, 1, 256),
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and ``outlast up`` use this)."""
        return dataclasses.replace(self, **changes)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError(
                "DATABASE_URL is not set. Set it to a PostgreSQL URL, or run `outlast up`, "
                "which starts an embedded PostgreSQL when none is given."
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise SettingsError(
                "REDIS_URL is not set. Set it to a Redis URL, or run `outlast up`, "
                "which starts an embedded Redis when none is given."
            )
        return self.redis_url


_current: Settings | None = None


def current() -> Settings:
    """The process's settings, read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def configure(settings: Settings) -> Settings:
    """Install ``settings`` as the process's settings (tests, ``outlast up``)."""
    global _current
    _current = settings
    return settings
