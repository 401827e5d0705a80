"""Operators' commands: ``outlast db …`` and ``outlast tenants …``."""

from __future__ import annotations

import json
import re
import sys
from datetime import timedelta
from typing import Any

import click

from app import settings
from app.store import db, tenants
from app.store.representation import rfc3339


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


class Duration(click.ParamType):
    """``90d``, ``12h``, ``30m``, ``45s``: a positive integer and a unit."""

    name = "duration"
    _FORM = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
    _UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    LONGEST = timedelta(days=36500)  # a century: past that, say "no expiry" (omit it)

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = self._FORM.match(str(value))
        if not match or int(match.group(1)) == 0:
            self.fail(
                f"{value!r} is not a duration: give a positive integer and s, m, h or d "
                "(for example 90d or 12h)",
                param,
                ctx,
            )
        try:
            duration = timedelta(**{self._UNIT[match.group(2)]: int(match.group(1))})
        except OverflowError:
            duration = self.LONGEST * 2
        if duration > self.LONGEST:
            self.fail(f"{value!r} is longer than {self.LONGEST.days}d", param, ctx)
        return duration


def _tenant_id(conn: Any, name: str) -> str:
    tenant_id = tenants.find_by_name(conn, name)
    if tenant_id is None:
        _fail(f"no tenant named {name!r}")
    return tenant_id


@tenants_group.command("add-key")
@click.argument("name")
@click.option(
    "--expires-in",
    type=Duration(),
    default=None,
    help="Refuse the key after this long: an integer and s, m, h or d (e.g. 90d).",
)
def tenants_add_key(name: str, expires_in: timedelta | None) -> None:
    """Issue another API key for tenant NAME; prints it once, as one JSON object.

    The prefix names the key in `tenants keys` and `tenants revoke-key`.
    """
    try:
        settings.current().require_database_url()
        with db.transaction() as conn:
            tenant_id = _tenant_id(conn, name)
            issued = tenants.issue_key(conn, tenant_id, expires_in)
    except settings.SettingsError as exc:
        _fail(str(exc))
    click.echo(
        json.dumps(
            {
                "tenant_id": tenant_id,
                "name": name,
                "api_key": issued.api_key,
                "prefix": issued.prefix,
                "expires_at": rfc3339(issued.expires_at),
            }
        )
    )


def _key_json(key: tenants.KeyInfo) -> str:
    return json.dumps(
        {
            "prefix": key.prefix,
            "created_at": rfc3339(key.created_at),
            "last_used_at": rfc3339(key.last_used_at),
            "expires_at": rfc3339(key.expires_at),
            "revoked_at": rfc3339(key.revoked_at),
        }
    )


@tenants_group.command("keys")
@click.argument("name")
def tenants_keys(name: str) -> None:
    """List tenant NAME's API keys, one JSON object per line (prefixes, never keys).

    last_used_at is recorded at most once a minute per key and web process.
    """
    try:
        settings.current().require_database_url()
        with db.transaction() as conn:
            keys = tenants.list_keys(conn, _tenant_id(conn, name))
    except settings.SettingsError as exc:
        _fail(str(exc))
    for key in keys:
        click.echo(_key_json(key))


@tenants_group.command("revoke-key")
@click.argument("prefix")
def tenants_revoke_key(prefix: str) -> None:
    """Revoke the API key whose prefix is PREFIX (as `tenants keys` shows it).

    Every web process refuses it (401) within a few seconds. Prints the key's line.
    """
    try:
        settings.current().require_database_url()
        with db.transaction() as conn:
            revoked = tenants.revoke_key(conn, prefix)
    except (settings.SettingsError, tenants.KeyNotFound) as exc:
        _fail(str(exc))
    click.echo(_key_json(revoked))


COMMANDS = (db_group, tenants_group)
