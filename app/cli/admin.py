"""Operators' commands: ``outlast db …`` and ``outlast tenants …``."""

from __future__ import annotations

import json
import sys

import click

from app import settings
from app.store import db, tenants


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group("db")
def db_group() -> None:
    """The database schema (Alembic migrations)."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (the Procfile's release phase; safe to run twice)."""
    try:
        db.upgrade(settings.current().require_database_url(), revision)
    except settings.SettingsError as exc:
        _fail(str(exc))
    click.echo(f"database at revision {db.current_revision()}", err=True)


@db_group.command("current")
def db_current() -> None:
    """Print the schema revision the database is at."""
    try:
        click.echo(db.current_revision(settings.current().require_database_url()) or "none")
    except settings.SettingsError as exc:
        _fail(str(exc))


@click.group("tenants")
def tenants_group() -> None:
    """Tenants and their API keys."""


@tenants_group.command("create")
@click.argument("name")
def tenants_create(name: str) -> None:
    """Create tenant NAME; prints its id, API key and webhook secret as one JSON object.

    The API key is shown only here: store it now.
    """
    try:
        settings.current().require_database_url()
        with db.transaction() as conn:
            created = tenants.create(conn, name)
    except (settings.SettingsError, tenants.TenantExists) as exc:
        _fail(str(exc))
    click.echo(json.dumps(created.as_json()))


@tenants_group.command("add-key")
@click.argument("name")
def tenants_add_key(name: str) -> None:
    """Issue another API key for tenant NAME (prints it once)."""
    with db.transaction() as conn:
        tenant_id = tenants.find_by_name(conn, name)
        if tenant_id is None:
            _fail(f"no tenant named {name!r}")
        key = tenants.issue_api_key(conn, tenant_id)
    click.echo(json.dumps({"tenant_id": tenant_id, "name": name, "api_key": key}))


COMMANDS = (db_group, tenants_group)
