"""Telling "the database is unreachable" apart from a bug."""

from __future__ import annotations

import sqlalchemy.exc as sa_exc

# SQLSTATEs that callers answer in their own way.
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout passed
DEADLOCK_DETECTED = "40P01"


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a SQLAlchemy ``DBAPIError``, else ``None``."""
    return getattr(getattr(error, "orig", None), "pgcode", None)


def is_database_unavailable(error: BaseException) -> bool:
    """True for connection failures and dropped connections (answer 503, retry)."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    if isinstance(error, sa_exc.TimeoutError):  # pool exhausted
        return True
    import psycopg2

    return isinstance(error, psycopg2.OperationalError | psycopg2.InterfaceError)
