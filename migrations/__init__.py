"""Alembic migrations: the PostgreSQL schema, one revision a change."""
