"""The built-in agents' contracts, the registry, the HTTP tool and the model clients."""

from __future__ import annotations

import json
import time

import pytest

from app.dev.embedded import free_port
from app.engine import registry as registry_mod
from app.engine.http_tools import fetch
from app.engine.llm import ChatCompletionsClient, OfflineModel
from app.engine.registry import get_agent, validate_input
from outlast.sdk import AgentError, TransientToolError
from tests.engine.conftest import TEST_AGENTS
from tests.engine.servers import LocalServer, json_answer


@pytest.fixture
def no_database_settings():
    """Settings for tests that need no servers (the test agents, private URLs allowed)."""
    from app import settings as settings_mod
    from app.settings import Settings

    previous = settings_mod._current
    yield settings_mod.configure(
        Settings.from_env({"OUTLAST_AGENTS": TEST_AGENTS, "OUTLAST_WEBHOOK_ALLOW_PRIVATE": "1"})
    )
    settings_mod._current = previous


# --- input schemas ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "input", "errors"),
    [
        ("echo", {"message": "hi"}, set()),
        ("echo", {"message": "hi", "steps": 10000, "step_seconds": 3600, "fail_at_step": 1}, set()),
        ("echo", {}, {"input.message"}),
        ("echo", {"message": "hi", "steps": 0}, {"input.steps"}),
        ("echo", {"message": "hi", "steps": 10001}, {"input.steps"}),
        ("echo", {"message": "hi", "steps": "3"}, {"input.steps"}),
        ("echo", {"message": "hi", "step_seconds": -1}, {"input.step_seconds"}),
        ("echo", {"message": "hi", "fail_at_step": 1.5}, {"input.fail_at_step"}),
        ("echo", {"message": 5, "extra": 1}, {"input.message", "input.extra"}),
        ("calls", {"url": "https://example.com/x"}, set()),
        ("calls", {"url": "ftp://example.com"}, {"input.url"}),
        ("calls", {"url": "http://x", "calls": 1001}, {"input.calls"}),
        ("calls", {"url": "http://x", "step_seconds": 61}, {"input.step_seconds"}),
        ("approval", {"question": "ok?"}, set()),
        ("approval", {}, {"input.question"}),
        ("research", {"question": "q", "urls": ["http://a.example/"]}, set()),
        ("research", {"question": "q", "urls": []}, {"input.urls"}),
        ("research", {"question": "q", "urls": ["http://a"] * 51}, {"input.urls"}),
        ("research", {"question": "q", "urls": ["javascript:alert(1)"]}, {"input.urls.0"}),
        ("research", {"urls": ["http://a"]}, {"input.question"}),
        ("sleepy", {"seconds": 1}, set()),
        ("sleepy", {"seconds": 604800}, set()),
        ("sleepy", {"seconds": 0.5}, {"input.seconds"}),
        ("sleepy", {"seconds": 604801}, {"input.seconds"}),
        ("sleepy", {}, {"input.seconds"}),
    ],
)
def test_builtin_agent_inputs_are_checked_against_their_schemas(
    no_database_settings, agent, input, errors
):
    found = validate_input(get_agent(agent), input)
    assert set(found) == errors
    assert all(isinstance(m, str) and m for messages in found.values() for m in messages)


def test_input_that_is_not_an_object_is_reported_on_input(no_database_settings):
    assert set(validate_input(get_agent("echo"), ["hi"])) == {"input"}


def test_agents_come_from_builtins_entry_points_and_outlast_agents(no_database_settings):
    assert {"echo", "calls", "approval", "research", "sleepy"} <= set(registry_mod.names())
    assert get_agent("test_two_calls") is not None  # from OUTLAST_AGENTS (conftest's env)
    assert get_agent("no_such_agent") is None
    from importlib.metadata import entry_points

    assert "app.agents.builtin" in [ep.value for ep in entry_points(group="outlast.agents")]


def test_a_broken_agent_module_does_not_hide_the_others(no_database_settings):
    from app import settings as settings_mod

    settings_mod.configure(no_database_settings.replace(agents=("tests.engine.no_such_module",)))
    assert get_agent("echo") is not None


def test_registering_another_function_under_a_taken_name_is_an_error(no_database_settings):
    from outlast import agent

    @agent("echo", input_schema={"type": "object"})
    def impostor(ctx, state):  # pragma: no cover - never registered
        return ctx.done({})

    registry_mod.load()  # the built-in echo is registered first
    with pytest.raises(registry_mod.AgentConflict):
        registry_mod.register(impostor)
    assert registry_mod.get_agent("echo").step is not impostor.step


def test_the_sdk_is_plain_data_and_the_registry_finds_it_in_a_module(no_database_settings):
    import types

    from outlast import Agent, Tool, agent, tool

    # Given a module that declares an agent and a tool with the public SDK only
    module = types.ModuleType("plain_sdk_module")
    exec(
        "from outlast import agent, tool\n"
        "@tool('plain_tool')\n"
        "def plain_tool(call):\n"
        "    return {'key': call.key}\n"
        "@agent('plain_agent', input_schema={'type': 'object'})\n"
        "def plain_agent(ctx, state):\n"
        "    return ctx.done(ctx.tool('plain_tool'))\n",
        module.__dict__,
    )
    # Then the decorators returned plain objects and registered nothing themselves
    assert isinstance(module.plain_agent, Agent) and isinstance(module.plain_tool, Tool)
    assert get_agent("plain_agent") is None
    assert agent is not None and tool is not None
    # When the registry collects the module, both are found by name
    registry_mod.collect(module)
    assert get_agent("plain_agent") is module.plain_agent
    assert registry_mod.get_tool("plain_tool") is module.plain_tool


# --- research and http_get ----------------------------------------------------------------

BIG_PAGE = b"<html><head><title>Big</title></head><body>" + b"<p>words</p>" * 300_000


def site(request):
    pages = {
        "/a": (
            200,
            "text/html; charset=utf-8",
            b"<html><head><title>Alpha page</title>"
            b"<script>var hidden = 1;</script></head><body><p>Alpha &amp; text</p></body></html>",
        ),
        "/plain": (200, "text/plain", b"just   text"),
        "/img": (200, "image/png", b"\x89PNG\r\n\x1a\n"),
        "/missing": (404, "text/html", b"<title>Not here</title>"),
        "/big": (200, "text/html", BIG_PAGE),
    }
    if request.path == "/r":
        return 302, {"Location": "/a"}, b""
    if request.path == "/loop":
        return 302, {"Location": "/loop"}, b""
    if request.path == "/slow":
        time.sleep(1.0)
    status, content_type, body = pages.get(request.path, (200, "text/html", b"<title>x</title>"))
    return status, {"Content-Type": content_type}, body


@pytest.fixture
def website():
    server = LocalServer(site)
    yield server
    server.close()


def test_fetch_extracts_title_and_text_and_follows_a_redirect(no_database_settings, website):
    page = fetch(website.url + "/r")

    assert page["status"] == 200
    assert page["final_url"] == website.url + "/a"
    assert page["title"] == "Alpha page"
    assert page["text"] == "Alpha & text"  # no script, entities decoded
    assert page["error"] is None


def test_fetch_limits_redirects_size_time_and_content_types(no_database_settings, website):
    assert fetch(website.url + "/loop", max_redirects=3)["error"] == "more than 3 redirects"
    big = fetch(website.url + "/big", max_bytes=100_000)
    assert big["truncated"] is True and big["title"] == "Big"
    assert fetch(website.url + "/slow", timeout=0.3)["error"].startswith("timed out")
    assert fetch(website.url + "/img")["error"] == "unsupported content type image/png"
    assert fetch(website.url + "/plain")["text"] == "just text"
    missing = fetch(website.url + "/missing")
    assert missing["status"] == 404 and missing["error"] == "HTTP 404"
    refused = fetch(f"http://127.0.0.1:{free_port()}/")
    assert refused["status"] is None and refused["error"].startswith("unreachable")


def test_fetch_calls_private_addresses_by_default(no_database_settings, website):
    page = fetch(website.url + "/a")
    assert page["status"] == 200 and website.count() == 1


def test_fetch_refuses_private_addresses_when_tools_deny_private(no_database_settings, website):
    from app import settings as settings_mod

    settings_mod.configure(no_database_settings.replace(tools_deny_private=True))
    page = fetch(website.url + "/a")
    assert page["status"] is None and page["error"].startswith("refused")
    assert website.count() == 0


def test_research_records_every_url_and_answers_with_the_offline_model(
    celery_worker, tasks, website
):
    dead = f"http://127.0.0.1:{free_port()}/"
    urls = [website.url + "/r", website.url + "/missing", dead, website.url + "/plain"]
    task_id = tasks.submit("research", {"question": "What is alpha?", "urls": urls})

    task = tasks.wait_status(task_id, "completed")

    result = task["result"]
    assert [s["url"] for s in result["sources"]] == urls
    assert [s["status"] for s in result["sources"]] == [200, 404, None, 200]
    assert result["sources"][0]["title"] == "Alpha page"
    assert result["sources"][2]["error"].startswith("unreachable")
    assert "What is alpha?" in result["answer"]
    assert task["step"] == len(urls) + 1  # one step per URL, then the answer
    names = [
        r["name"]
        for r in tasks.rows(
            "SELECT name FROM tool_calls WHERE task_id = :id ORDER BY step_index", id=task_id
        )
    ]
    assert names == ["http_get"] * 4 + ["llm"]


# --- model clients ------------------------------------------------------------------------


def test_offline_model_answers_deterministically_and_calls_tools():
    model = OfflineModel()
    messages = [{"role": "user", "content": "weather in Oslo"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "forecast",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]

    first = model.complete(messages, tools)
    assert first == model.complete(messages, tools)
    call = first["message"]["tool_calls"][0]
    assert call["function"]["name"] == "forecast"
    assert json.loads(call["function"]["arguments"]) == {"city": "weather in Oslo"}

    answered = [
        *messages,
        first["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
    ]
    final = model.complete(answered, tools)
    assert final["finish_reason"] == "stop" and "sunny" in final["message"]["content"]


@pytest.mark.parametrize(
    ("status", "error"), [(500, TransientToolError), (429, TransientToolError), (400, AgentError)]
)
def test_chat_client_sorts_endpoint_errors_into_transient_and_fatal(status, error):
    server = LocalServer(lambda r: json_answer(status, {"error": {"message": "nope"}}))
    try:
        with pytest.raises(error):
            ChatCompletionsClient(server.url, "k", "m").complete(
                [{"role": "user", "content": "hi"}]
            )
    finally:
        server.close()


def test_chat_client_reports_an_unreachable_endpoint_as_transient():
    with pytest.raises(TransientToolError):
        ChatCompletionsClient(f"http://127.0.0.1:{free_port()}", None, None).complete([])
