"""A connection the database drops in the middle of a transaction is reported as the
database being unavailable (503, back off, retry), never as some other error: every
guarantee about a database outage rests on telling the two apart."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.store import db, db_errors

pytestmark = pytest.mark.faults


def test_connection_dropped_mid_transaction_is_reported_as_database_unavailable(
    settings, database_url
):
    # Given a transaction on the application's engine (with every listener installed)
    import app.ops.metrics  # noqa: F401  (its commit/rollback listeners are part of the path)

    killer = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with pytest.raises(Exception) as raised:
            with db.transaction() as conn:
                pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                # When the server terminates its connection
                with killer.connect() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                conn.execute(sa.text("SELECT 1"))
    finally:
        killer.dispose()

    # Then what comes out says "database unavailable"
    assert db_errors.is_database_unavailable(raised.value), repr(raised.value)
    # and the next transaction simply works
    with db.transaction() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
