"""Operators' commands about agent versions: ``outlast agents check`` (V2.md section 7)."""

from __future__ import annotations

import sys

import click

from app import settings
from app.engine import registry
from app.store import db, fleet


@click.group("agents")
def agents_group() -> None:
    """Agent versions and the tasks in flight on them."""


@agents_group.command("check")
def agents_check() -> None:
    """Before a deploy that drops old code: exit 1 listing every agent version that has
    tasks in flight and that this code (its OUTLAST_AGENTS) can neither run nor migrate
    from, one line each (``<agent> <version>: <n> tasks in flight``); exit 0 otherwise.
    Needs DATABASE_URL."""
    try:
        settings.current().require_database_url()
    except settings.SettingsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    with db.engine().connect() as conn:
        in_flight = fleet.tasks_in_flight(conn)
    stranded = [
        (pair, count)
        for pair, count in sorted(
            in_flight.items(), key=lambda p: (p[0][0], registry.version_key(p[0][1]))
        )
        if registry.resolve(*pair) is None
    ]
    for (agent, version), count in stranded:
        click.echo(f"{agent} {version}: {count} tasks in flight")
    sys.exit(1 if stranded else 0)


COMMANDS = (agents_group,)
