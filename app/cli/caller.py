"""The callers' commands: ``outlast submit``, ``status``, ``events``, ``cancel``, ``input``,
``results``, ``ack``, ``delete``.

They talk to a running Outlast over HTTP with :class:`outlast.client.Client`; the URL and the
API key come from ``--url``/``--api-key`` or ``OUTLAST_URL``/``OUTLAST_API_KEY`` (the
lines ``outlast up`` prints). ``--json`` prints machine-readable JSON on stdout.

Exit codes: 0 done (a waited-for task completed), 1 the API refused or could not be
reached, 2 bad usage, 3 the task failed, 4 it was cancelled, 5 it waits for input,
6 ``--timeout`` passed while waiting.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from outlast.client import Client, OutlastError, WaitTimeout

EXIT_API_ERROR = 1
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_INPUT_REQUIRED = 5
EXIT_TIMEOUT = 6

# ``submit --wait`` first asks the server to answer once the task is done (Prefer: wait),
# for a second only: a task that takes longer gets a progress bar from then on.
SUBMIT_PREFER_WAIT_SECONDS = 1

STATUS_EXIT = {
    "completed": 0,
    "failed": EXIT_FAILED,
    "cancelled": EXIT_CANCELLED,
    "input_required": EXIT_INPUT_REQUIRED,
}


def _client_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --url, --api-key and --json; pass a ready ``client``; turn API errors into
    a message on stderr and exit code 1."""

    @click.option(
        "--url",
        envvar="OUTLAST_URL",
        default="http://127.0.0.1:8000",
        show_default=True,
        show_envvar=True,
        help="The Outlast API's base URL.",
    )
    @click.option(
        "--api-key",
        envvar="OUTLAST_API_KEY",
        required=True,
        show_envvar=True,
        help="Your tenant's API key.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (for scripts).")
    @functools.wraps(func)
    def wrapper(url: str, api_key: str, as_json: bool, **kwargs: Any) -> None:
        client = Client(url, api_key, max_retries=3)  # a person waits: give up sooner
        try:
            func(client=client, as_json=as_json, **kwargs)
        except OutlastError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_API_ERROR)
        finally:
            client.close()

    return wrapper


def _json_argument(value: str, what: str) -> Any:
    """``value`` as JSON, or the JSON in the file ``@path``."""
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def _summary(task: dict[str, Any]) -> str:
    line = f"{task['id']}  {task['agent']}  {task['status']}  step {task['step']}"
    progress = task.get("progress")
    if progress:
        line += f"  progress {progress.get('current')}/{progress.get('total')}"
        if progress.get("message"):
            line += f" {progress['message']}"
    if task.get("attempt", 1) > 1:
        line += f"  attempt {task['attempt']}"
    return line


def _report_outcome(task: dict[str, Any], as_json: bool) -> None:
    """Print a settled task (result, error or input request) and exit with its code."""
    status = task["status"]
    if as_json:
        _print_json(task)
    elif status == "completed" and task["agent"] in NARRATING_AGENTS:
        usage = task.get("usage") or {}
        click.echo(
            f"{task['result'].get('turns')} turns; usage: {usage.get('model_calls')} model "
            f"calls, {usage.get('tool_calls')} tool calls, "
            f"{(usage.get('input_tokens') or 0) + (usage.get('output_tokens') or 0)} tokens",
            err=True,
        )
        click.echo(task["result"].get("content") or "")  # the final answer
    elif status == "completed":
        _print_json(task["result"])
    elif status == "failed":
        error = task.get("error") or {}
        click.echo(f"{task['id']} failed: {error.get('type')}: {error.get('message')}", err=True)
    elif status == "cancelled":
        click.echo(f"{task['id']} cancelled", err=True)
    elif status == "input_required":
        request = task.get("input_request") or {}
        click.echo(f"{task['id']} waits for input: {request.get('prompt')}", err=True)
        click.echo(f"  schema: {json.dumps(request.get('schema'))}", err=True)
        click.echo(f"  answer with: outlast input {task['id']} '<json>'", err=True)
    sys.exit(STATUS_EXIT.get(status, 0))


class _Progress:
    """A progress bar on stderr driven by the task's ``task.progress`` events."""

    def __init__(self, label: str):
        self.label = label
        self.bar: Any = None
        self._open = contextlib.ExitStack()

    def show(self, progress: dict[str, Any] | None) -> None:
        if not progress or not isinstance(progress.get("total"), int | float):
            return
        total = max(int(progress["total"]), 1)
        current = min(max(int(progress.get("current") or 0), 0), total)
        if self.bar is None:
            self.bar = self._open.enter_context(
                click.progressbar(
                    length=total,
                    label=self.label,
                    file=sys.stderr,
                    show_pos=True,
                    show_percent=True,
                    item_show_func=lambda message: message,
                )
            )
        self.bar.length = total
        self.bar.update(current - self.bar.pos, current_item=progress.get("message") or None)

    def close(self) -> None:
        self._open.close()  # the bar's last line, finished
        self.bar = None


# Agents whose progress messages are a running account (each turn and tool call of a
# model loop): printed one line each as they happen, not drawn as a bar.
NARRATING_AGENTS = frozenset({"assistant"})


def _follow(client: Client, task: dict[str, Any], show_bar: bool) -> dict[str, Any]:
    """Follow the task's events until it settles; returns the task as of its last event."""
    narrate = show_bar and task["agent"] in NARRATING_AGENTS
    progress = _Progress(f"{task['agent']} {task['id']}") if show_bar and not narrate else None
    try:
        for event in client.events(task["id"], follow=True):
            task = event["data"]["task"]
            if narrate and event["type"] == "task.progress":
                click.echo(f"  {(task.get('progress') or {}).get('message')}", err=True)
            if progress is not None:
                progress.show(task.get("progress"))
            if task["status"] in STATUS_EXIT:
                break
    finally:
        if progress is not None:
            progress.close()
    return task


@click.command("submit")
@click.argument("agent")
@click.option(
    "--input", "input_", default="{}", metavar="JSON|@FILE", help="The agent's input (JSON)."
)
@click.option("--metadata", default=None, metavar="JSON|@FILE", help="Metadata (JSON object).")
@click.option("--webhook-url", default=None, help="URL that receives the task's signed events.")
@click.option("--timeout-seconds", type=click.IntRange(1, 604800), default=None)
@click.option("--idempotency-key", default=None, help="Default: a new random key.")
@click.option(
    "--budget",
    default=None,
    metavar="JSON|@FILE",
    help='Limits, e.g. \'{"max_model_calls": 10, "on_exhausted": "ask"}\'.',
)
@click.option("--wait", "wait_", is_flag=True, help="Show progress and wait until it settles.")
@_client_command
def submit(
    client: Client,
    as_json: bool,
    agent: str,
    input_: str,
    metadata: str | None,
    webhook_url: str | None,
    timeout_seconds: int | None,
    idempotency_key: str | None,
    budget: str | None,
    wait_: bool,
) -> None:
    """Submit a task to AGENT; prints its id (or, with --wait, its result).

    With --wait, an assistant task shows each model turn and tool call as it happens,
    then its final answer.

    The submission is retried with the same Idempotency-Key until it is answered, so it
    creates one task however flaky the network is. With --wait, a task done within a
    second is answered by the submission itself (Prefer: wait).
    """
    task = client.submit(
        agent,
        _json_argument(input_, "--input"),
        metadata=_json_argument(metadata, "--metadata") if metadata else None,
        webhook_url=webhook_url,
        timeout_seconds=timeout_seconds,
        idempotency_key=idempotency_key,
        budget=_json_argument(budget, "--budget") if budget else None,
        # A narrated agent's turns are what --wait shows: follow those from the start.
        wait=SUBMIT_PREFER_WAIT_SECONDS if wait_ and agent not in NARRATING_AGENTS else None,
    )
    if not wait_:
        if as_json:
            _print_json(task)
        else:
            click.echo(task["id"])
        return
    # The id first, whatever happens next: it is what `outlast ack ID` needs.
    click.echo(f"submitted {task['id']} ({agent})", err=True)
    if task["status"] in STATUS_EXIT:  # answered by the submission itself
        _report_outcome(task, as_json)
    try:
        task = _follow(client, task, show_bar=True)
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; the task goes on: outlast status {task['id']}", err=True)
        sys.exit(130)
    if task["status"] not in STATUS_EXIT:
        task = client.get(task["id"])
    _report_outcome(task, as_json)


@click.command("status")
@click.argument("task_id")
@click.option(
    "--wait",
    "wait_",
    type=click.FloatRange(0, None),
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS for the task to settle (exit code says how it ended).",
)
@_client_command
def status(client: Client, as_json: bool, task_id: str, wait_: float | None) -> None:
    """Show a task. With --wait, the exit code says how it ended (as for submit --wait)."""
    exit_code = 0
    if wait_ is None:
        task = client.get(task_id)
    else:
        try:
            task = client.wait(task_id, timeout=wait_)
            exit_code = STATUS_EXIT.get(task["status"], 0)
        except WaitTimeout as exc:
            task = exc.task or client.get(task_id)
            exit_code = EXIT_TIMEOUT
    if as_json:
        _print_json(task)
    else:
        click.echo(_summary(task))
        if task["status"] == "completed":
            _print_json(task["result"])
        elif task["status"] in ("failed", "input_required"):
            detail = task.get("error") or task.get("input_request")
            click.echo(json.dumps(detail))
    sys.exit(exit_code)


@click.command("events")
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the task ends.")
@click.option("--after", type=click.IntRange(0, None), default=0, help="Only events after SEQ.")
@_client_command
def events(client: Client, as_json: bool, task_id: str, follow: bool, after: int) -> None:
    """List a task's events (one per line; JSON lines with --json)."""
    for event in client.events(task_id, after=after, follow=follow):
        if as_json:
            click.echo(json.dumps(event, separators=(",", ":")))
        else:
            task = event["data"]["task"]
            click.echo(
                f"{event['seq']:>4}  {event['timestamp']}  {event['type']:<20}  " + _summary(task)
            )
        sys.stdout.flush()


@click.command("cancel")
@click.argument("task_id")
@_client_command
def cancel(client: Client, as_json: bool, task_id: str) -> None:
    """Cancel a task (it stops at its next tool call or step boundary)."""
    task = client.cancel(task_id)
    _print_json(task) if as_json else click.echo(_summary(task))


@click.command("input")
@click.argument("task_id")
@click.argument("answer", metavar="JSON|@FILE")
@_client_command
def input_command(client: Client, as_json: bool, task_id: str, answer: str) -> None:
    """Answer a task that waits for input; it resumes."""
    task = client.send_input(task_id, _json_argument(answer, "the input"))
    _print_json(task) if as_json else click.echo(_summary(task))


@click.command("results")
@click.option("--agent", default=None, help="Only this agent's tasks.")
@click.option("--limit", type=click.IntRange(1, None), default=100, show_default=True)
@click.option("--ack", "ack_", is_flag=True, help="Acknowledge each result once listed.")
@_client_command
def results(client: Client, as_json: bool, agent: str | None, limit: int, ack_: bool) -> None:
    """List finished tasks whose result is not yet acknowledged, newest first (one per
    line; JSON lines with --json). Acknowledge them with `outlast ack ID` or --ack."""
    tasks = client.iter_tasks(agent=agent, acknowledged=False, page_size=min(limit, 100))
    for task in itertools.islice(tasks, limit):
        if ack_:
            task = client.ack(task["id"])
        if as_json:
            click.echo(json.dumps(task, separators=(",", ":")))
        else:
            click.echo(f"{task['finished_at']}  {_summary(task)}")
        sys.stdout.flush()


@click.command("children")
@click.argument("task_id")
@_client_command
def children(client: Client, as_json: bool, task_id: str) -> None:
    """List a task's child tasks in the order they were spawned (one per line; JSON
    lines with --json)."""
    for task in client.iter_children(task_id):
        if as_json:
            click.echo(json.dumps(task, separators=(",", ":")))
        else:
            click.echo(_summary(task))
        sys.stdout.flush()


@click.command("ack")
@click.argument("task_id")
@_client_command
def ack(client: Client, as_json: bool, task_id: str) -> None:
    """Acknowledge a finished task's result (it is purged after the retention period)."""
    task = client.ack(task_id)
    if as_json:
        _print_json(task)
    else:
        click.echo(f"{_summary(task)}  acknowledged {task['acknowledged_at']}")


@click.command("delete")
@click.argument("task_id")
@_client_command
def delete(client: Client, as_json: bool, task_id: str) -> None:
    """Delete a finished task now, with its events, checkpoints and tool-call log."""
    client.delete(task_id)
    if as_json:
        _print_json({"id": task_id, "deleted": True})
    else:
        click.echo(f"deleted {task_id}")


COMMANDS = (submit, status, events, cancel, input_command, results, children, ack, delete)
