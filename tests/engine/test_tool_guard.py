"""Agent tools under ``OUTLAST_TOOLS_DENY_PRIVATE=1``: the same connect-time SSRF guard as
webhooks, so DNS rebinding is refused; proxy variables ignored unless trusted.

The rebinding is real DNS behaviour played by a local resolver stand-in
(:mod:`tests.engine.rebinding`): a name that resolves to a public address when the tool
checks it and to 127.0.0.1 when the connection is made. A tripwire socket makes sure no
packet ever goes to the public address, whatever the code does.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest
import requests

from app import settings as settings_mod
from app.settings import Settings
from app.webhooks import urlguard
from tests.engine import rebinding
from tests.engine.conftest import ROOT, TEST_AGENTS
from tests.engine.servers import LocalServer
from tests.harness import wait_until

PAGE = b"<html><head><title>Internal</title></head><body>secret admin page</body></html>"


@pytest.fixture
def internal():
    """A service on loopback standing in for the operator's internal network."""
    server = LocalServer(lambda r: (200, {"Content-Type": "text/html"}, PAGE))
    yield server
    server.close()


@pytest.fixture
def tool_settings():
    previous = settings_mod._current

    def configure(**env: str) -> Settings:
        return settings_mod.configure(Settings.from_env({"OUTLAST_AGENTS": TEST_AGENTS, **env}))

    yield configure
    settings_mod._current = previous


def rebinding_url(server: LocalServer, path: str = "/admin") -> str:
    port = urlsplit(server.url).port
    return f"http://{uuid.uuid4().hex[:12]}{rebinding.SUFFIX}:{port}{path}"


def test_the_stand_in_rebinds_a_checked_name_to_loopback_for_an_unguarded_client(internal):
    # The control: without the connect-time guard, the check passes and the call lands
    # on the internal service. This is what the guard must stop.
    url = rebinding_url(internal)
    with rebinding.installed():
        assert urlguard.check_url(url, allow_private=False) == url  # first look-up: public
        with requests.Session() as plain:
            plain.trust_env = False
            assert plain.get(url, timeout=5).status_code == 200  # second: loopback
    assert internal.count() == 1


def test_http_get_refuses_at_connect_time_a_name_that_rebinds_to_loopback(internal, tool_settings):
    from app.engine.http_tools import fetch

    tool_settings(OUTLAST_TOOLS_DENY_PRIVATE="1")
    url = rebinding_url(internal)
    with rebinding.installed():
        page = fetch(url)

    assert page["status"] is None
    assert page["error"] == f"refused: {urlguard.CONNECTION_NOT_ALLOWED}"
    assert rebinding.LOOPBACK not in page["error"] and rebinding.PUBLIC not in page["error"]
    assert internal.count() == 0


def test_tools_ignore_proxy_variables_unless_told_to_trust_them(
    internal, tool_settings, monkeypatch
):
    from app.engine.http_tools import fetch

    proxy = LocalServer(lambda r: (200, {"Content-Type": "text/plain"}, b"via the proxy"))
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)

        tool_settings()
        direct = fetch(internal.url + "/a")
        assert direct["title"] == "Internal"
        assert (internal.count(), len(proxy.requests)) == (1, 0)

        tool_settings(OUTLAST_TOOLS_TRUST_ENV="1")
        proxied = fetch(internal.url + "/a")
        assert proxied["text"] == "via the proxy"
        assert (internal.count(), len(proxy.requests)) == (1, 1)
    finally:
        proxy.close()


def test_agents_in_a_worker_refuse_a_rebinding_name_at_connect_time(
    stack, tasks, internal, tmp_path
):
    # Given a worker with the guard on, whose resolver answers public-then-loopback for
    # *.rebind.test (the stand-in is loaded through OUTLAST_AGENTS, in the worker itself)
    lookups = tmp_path / "rebind.jsonl"
    worker = stack.start(
        "worker",
        extra_env={
            "OUTLAST_TOOLS_DENY_PRIVATE": "1",
            "OUTLAST_AGENTS": f"{TEST_AGENTS},tests.engine.rebinding",
            "OUTLAST_TEST_REBIND_LOG": str(lookups),
            "PYTHONPATH": str(ROOT),
        },
    )
    stack.start("beat")
    stack.wait_worker_ready(worker)

    # When research (http_get) and calls (http_post) are pointed at such names
    get_url, post_url = rebinding_url(internal), rebinding_url(internal, "/hooks")
    research = tasks.submit("research", {"question": "What is inside?", "urls": [get_url]})
    calls = tasks.submit("calls", {"url": post_url})

    # Then both are refused when the connection is made, and say no address
    done = tasks.wait_status(research, "completed", 60)
    source = done["result"]["sources"][0]
    assert source["error"] == f"refused: {urlguard.CONNECTION_NOT_ALLOWED}", stack.logs()
    failed = tasks.wait_status(calls, "failed", 60)
    assert failed["error"]["type"] == "agent_error"
    message = failed["error"]["message"]
    assert urlguard.CONNECTION_NOT_ALLOWED in message, message
    for text in (source["error"], message):
        assert rebinding.LOOPBACK not in text and rebinding.PUBLIC not in text

    # And the internal service saw nothing; each name was checked (public) and then
    # resolved again for the connection (loopback); nothing tried a public address.
    assert internal.count() == 0
    log = wait_until(lambda: rebinding.read_log(lookups), 5, what="stand-in log")
    for host in (get_url, post_url):
        name = host.split("//")[1].split(":")[0]
        answers = [e["address"] for e in log if e.get("lookup") == name]
        assert answers[:2] == [rebinding.PUBLIC, rebinding.LOOPBACK], (name, log)
    assert not [e for e in log if "tripwire" in e], log
