"""Alembic environment: runs migrations on the engine of DATABASE_URL."""

from alembic import context
from sqlalchemy import create_engine, pool

from app.settings import current

config = context.config


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or current().require_database_url()
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        # One advisory lock makes two concurrent `release` runs take turns.
        connection.exec_driver_sql("SELECT pg_advisory_lock(7061746)")
        # The lock is the session's; end the transaction that took it, so that each
        # revision runs in a transaction of its own (0004's new enum value must be
        # committed before 0005 uses it).
        connection.commit()
        try:
            context.configure(connection=connection, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.exec_driver_sql("SELECT pg_advisory_unlock(7061746)")
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `outlast db upgrade`")
run_migrations_online()
