"""The PostgreSQL engine, transactions, and the migration runner."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from app import settings as settings_mod

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

_engine: Engine | None = None
_engine_url: str | None = None
_lock = threading.Lock()


def engine() -> Engine:
    """The process's engine for the configured DATABASE_URL (created on first use)."""
    global _engine, _engine_url
    url = settings_mod.current().require_database_url()
    if _engine is None or _engine_url != url:
        with _lock:
            if _engine is None or _engine_url != url:
                if _engine is not None:
                    _engine.dispose()
                _engine = sa.create_engine(
                    url,
                    pool_size=10,
                    max_overflow=20,
                    pool_recycle=1800,
                    connect_args={"connect_timeout": 5, "application_name": "outlast"},
                )
                _ping_idle_connections(_engine)
                _engine_url = url
    return _engine


# A pooled connection idle longer than this is pinged before use (see below).
PING_IDLE_SECONDS = 1.0


def _ping_idle_connections(eng: Engine) -> None:
    """Ping a pooled connection at checkout only if it sat idle in the pool.

    ``pool_pre_ping`` would send ``SELECT 1`` at every checkout (six a step); a
    connection that was in use a moment ago is alive, and one that was idle may have been
    cut by a database restart. SQLAlchemy's documented custom-ping recipe: raising
    ``DisconnectionError`` makes the pool replace the connection and retry.
    """

    @sa.event.listens_for(eng, "checkin")
    def _checked_in(dbapi_connection, record) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @sa.event.listens_for(eng, "checkout")
    def _checked_out(dbapi_connection, record, proxy) -> None:
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at < PING_IDLE_SECONDS:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"pooled connection is gone: {exc}") from exc


def dispose_after_fork() -> None:
    """Drop pooled connections inherited from a parent process without closing them
    (they belong to the parent); the child opens its own."""
    if _engine is not None:
        _engine.dispose(close=False)


def dispose() -> None:
    global _engine, _engine_url
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _engine_url = None


@functools.lru_cache(maxsize=1024)
def text(sql: str) -> sa.TextClause:
    """``sa.text(sql)``, made once per SQL string. Making one parses the string for its
    bind parameters with a regular expression; the store's functions build their
    statements from a few fixed pieces (``lifecycle._update``), and a step made 34 such
    parses, ~10% of its Python CPU under cProfile. A ``TextClause`` is immutable, so one
    is shared by every caller and thread. Only for SQL that carries its values as bind
    parameters (all of ours does): a string with a value in it would fill the cache."""
    return sa.text(sql)


# Key in Connection.info of the state of the transaction that :func:`transaction` opened.
_TX_KEY = "outlast_transaction"


class TransactionState:
    """What one :func:`transaction` carries besides SQL: callbacks to run after its
    commit, and a place where subscribers keep per-transaction data (the outbox's batch)."""

    def __init__(self) -> None:
        self.after_commit: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.data: dict[str, Any] = {}


def state(conn: Connection) -> TransactionState:
    """The state of the :func:`transaction` that ``conn`` is in.

    Raises ``RuntimeError`` for a connection that is not in one: code that needs work
    after a commit (publishing the outbox, counting metrics) must run in
    :func:`transaction`, so no commit path can silently skip it.
    """
    current = conn.info.get(_TX_KEY)
    if current is None:
        raise RuntimeError("this needs a connection from app.store.db.transaction()")
    return current


def after_commit(conn: Connection, callback: Callable[..., Any], *args: Any) -> None:
    """Call ``callback(*args)`` once ``conn``'s transaction has committed; never if it
    rolls back. A callback that raises is logged; the commit stands."""
    state(conn).after_commit.append((callback, args))


@contextmanager
def transaction() -> Iterator[Connection]:
    """One database transaction: committed on success, rolled back on any exception.

    Every write goes through here. Its :func:`after_commit` callbacks (the outbox's
    publish, the metrics' counts) run right after the commit, in order.
    """
    tx = TransactionState()
    with engine().begin() as conn:
        conn.info[_TX_KEY] = tx
        try:
            yield conn
        finally:
            # Asking a connection the database dropped for its info would raise
            # PendingRollbackError over the real (OperationalError) cause; the pool
            # clears a dropped connection's info when it reconnects.
            if not conn.invalidated:
                conn.info.pop(_TX_KEY, None)
    for callback, args in tx.after_commit:
        try:
            callback(*args)
        except Exception:
            log.exception("an after-commit callback failed: %r", callback)


def alembic_config(database_url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision``; safe to run twice or concurrently."""
    from alembic import command

    url = database_url or settings_mod.current().require_database_url()
    command.upgrade(alembic_config(url), revision)


def current_revision(database_url: str | None = None) -> str | None:
    url = database_url or settings_mod.current().require_database_url()
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            exists = conn.execute(sa.text("SELECT to_regclass('alembic_version')")).scalar()
            if not exists:
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        eng.dispose()
