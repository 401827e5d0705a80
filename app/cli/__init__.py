"""The ``outlast`` command line: the stack (up, web, worker, beat, flower), the
database and tenants (operators), and tasks (callers)."""

from __future__ import annotations

import click

from app.cli import admin, agents, caller, server


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Outlast: durable, checkpointed execution of long-running AI agent tasks."""


for command in (*server.COMMANDS, *admin.COMMANDS, *agents.COMMANDS, *caller.COMMANDS):
    main.add_command(command)
