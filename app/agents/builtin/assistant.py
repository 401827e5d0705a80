"""``assistant`` (V2.md section 9): a model drives the tools, one model turn per step.

Each step makes one ``ctx.llm`` call with the conversation so far and the tools'
schemas, then every tool call the model asked for, each a logged call with its own key
(replayed, never repeated, after a crash). The conversation lives in the checkpoint.
A tool that raises, or an HTTP tool that answers 4xx, gives the model ``{"error":
...}``; 5xx and connection errors are retried with the same key, then the step is
retried. ``ask_human`` waits for a person without holding a worker.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from app import settings as settings_mod
from app.agents.builtin.schemas import HTTP_URL
from app.engine.context import StepContext, is_transient
from app.engine.http_tools import post_declared_tool
from app.engine.registry import get_tool
from app.validation import schema_errors
from app.webhooks import urlguard
from outlast.sdk import Cancelled, Outcome, Tool, agent

TOOL_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"}
MAX_TURNS = 200
# What the model is shown of one tool result; the rest is cut (the checkpoint keeps the
# whole conversation, so this bounds how fast it grows).
TOOL_RESULT_MAX_CHARS = 100_000
ASK_HUMAN = "ask_human"
# Tools that are the engine's own, not the operator's.
NOT_OFFERED = frozenset({"llm"})

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1},
        "messages": {
            "type": "array",
            "maxItems": 1000,
            "items": {
                "type": "object",
                "properties": {"role": {"type": "string"}},
                "required": ["role"],
            },
        },
        "system": {"type": "string"},
        "model": {"type": "string", "minLength": 1, "maxLength": 200},
        "tools": {"type": "array", "items": TOOL_NAME, "maxItems": 64},
        "http_tools": {
            "type": "array",
            "maxItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": TOOL_NAME,
                    "description": {"type": "string", "maxLength": 4000},
                    "url": HTTP_URL,
                    "parameters": {"type": "object"},
                },
                "required": ["name", "url"],
                "additionalProperties": False,
            },
        },
        "ask_human": {"type": "boolean", "default": False},
        "max_turns": {"type": "integer", "minimum": 1, "maximum": MAX_TURNS, "default": 20},
    },
    "additionalProperties": False,
}

ASK_HUMAN_TOOL = {
    "type": "function",
    "function": {
        "name": ASK_HUMAN,
        "description": "Ask the human you work for a question and wait for the answer.",
        "parameters": {
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


# --- submission checks (beyond the JSON Schema) ---------------------------------------------


def check_input(input: Any) -> dict[str, list[str]]:
    """What the input schema cannot say: a prompt or messages, known tool names, unique
    names, valid parameter schemas, and the webhook SSRF rules on ``http_tools`` URLs.
    Returns ``{"input.<path>": [messages]}`` (the API answers ``422``)."""
    if not isinstance(input, Mapping):
        return {}
    errors: dict[str, list[str]] = {}
    if "prompt" not in input and "messages" not in input:
        errors["input.prompt"] = ["is required unless messages is given"]
    seen: set[str] = {ASK_HUMAN} if input.get("ask_human") else set()
    for i, name in enumerate(input.get("tools") or []):
        if not isinstance(name, str):
            continue
        if name in NOT_OFFERED or get_tool(name) is None:
            errors[f"input.tools.{i}"] = [f"no tool named {name!r} is registered on this server"]
        elif name in seen:
            errors[f"input.tools.{i}"] = [f"the tool name {name!r} is used twice"]
        seen.add(name)
    allow_private = settings_mod.current().webhook_allow_private
    for i, declared in enumerate(input.get("http_tools") or []):
        if not isinstance(declared, Mapping):
            continue
        name = declared.get("name")
        if isinstance(name, str):
            if name in seen:
                errors[f"input.http_tools.{i}.name"] = [f"the tool name {name!r} is used twice"]
            seen.add(name)
        parameters = declared.get("parameters")
        if isinstance(parameters, Mapping):
            try:
                Draft202012Validator.check_schema(dict(parameters))
            except SchemaError as exc:
                errors[f"input.http_tools.{i}.parameters"] = [
                    f"is not a JSON Schema: {exc.message}"
                ]
        url = declared.get("url")
        if isinstance(url, str):
            try:
                urlguard.check_url(url, allow_private=allow_private)
            except urlguard.UnsafeUrl:
                # Said without the address the host resolved to (V2.md section 12a).
                errors[f"input.http_tools.{i}.url"] = [
                    "must be a public http(s) URL: private, loopback, link-local, "
                    "multicast and reserved addresses are refused (as for webhook_url)"
                ]
    return errors


# --- the tools the model is offered ---------------------------------------------------------

_JSON_TYPES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "list": "array",
    "dict": "object",
}


def _signature_parameters(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON Schema for a registered tool's arguments, from ``fn(call, ...)``'s
    signature: each parameter after ``call``, typed by its annotation, required unless
    it has a default."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    try:
        parameters = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return dict(EMPTY_PARAMETERS)
    for param in parameters:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = param.annotation
        name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        kind = _JSON_TYPES.get(str(name).split("[")[0].split("|")[0].strip())
        properties[param.name] = {"type": kind} if kind else {}
        if param.default is param.empty:
            required.append(param.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _function(name: str, description: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": dict(parameters)},
    }


@dataclasses.dataclass(frozen=True)
class _Offered:
    schema: dict[str, Any]  # the OpenAI ``tools`` entry
    tool: Tool  # what runs the call (its errors become {"error": ...})
    parameters: Mapping[str, Any]


def _errors_as_results(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A tool that raises gives the model ``{"error": <message>}`` (and the log keeps it
    as the call's output, so a re-run replays it); transient errors still retry."""

    def run(call: Any, **args: Any) -> Any:
        try:
            result = fn(call, **args)
        except Cancelled:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            return {"error": str(exc) or type(exc).__name__}
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return {"error": f"the tool returned a value that is not JSON: {exc}"}
        return result

    return run


def _offered_tools(input: Mapping[str, Any]) -> dict[str, _Offered]:
    offered: dict[str, _Offered] = {}
    for name in input.get("tools") or []:
        spec = get_tool(name)
        if spec is None:  # unregistered since the submission: the model is told when it calls
            continue
        doc = (inspect.getdoc(spec.fn) or "").strip().split("\n\n")[0]
        parameters = _signature_parameters(spec.fn)
        offered[name] = _Offered(
            _function(name, " ".join(doc.split()), parameters),
            dataclasses.replace(spec, fn=_errors_as_results(spec.fn)),
            parameters,
        )
    for declared in input.get("http_tools") or []:
        url = declared["url"]
        parameters = declared.get("parameters") or EMPTY_PARAMETERS

        offered[declared["name"]] = _Offered(
            _function(declared["name"], declared.get("description") or "", parameters),
            Tool(declared["name"], _errors_as_results(_poster(url))),
            parameters,
        )
    return offered


def _poster(url: str) -> Callable[..., Any]:
    def post(call: Any, **arguments: Any) -> Any:
        return post_declared_tool(call, url, arguments)

    return post


# --- the loop ---------------------------------------------------------------------------------


def _initial_state(input: Mapping[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if input.get("system"):
        messages.append({"role": "system", "content": input["system"]})
    messages.extend(dict(m) for m in input.get("messages") or [])
    if input.get("prompt"):
        messages.append({"role": "user", "content": input["prompt"]})
    return {"messages": messages, "turns": 0, "pending": [], "awaiting": None}


def _content(result: Any) -> str:
    text = result if isinstance(result, str) else json.dumps(result)
    if len(text) > TOOL_RESULT_MAX_CHARS:
        text = text[:TOOL_RESULT_MAX_CHARS] + " [truncated]"
    return text


def _excerpt(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _run_pending(
    ctx: StepContext, state: dict[str, Any], offered: Mapping[str, _Offered]
) -> Outcome | None:
    """Make the tool calls the model asked for, in order; ``ask_human`` ends the step."""
    messages = state["messages"]
    turn, max_turns = state["turns"], ctx.input["max_turns"]
    while state["pending"]:
        tool_call = state["pending"].pop(0)
        function = tool_call.get("function") or {}
        name = function.get("name")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError) as exc:
            arguments, result = None, {"error": f"the arguments are not valid JSON: {exc}"}
        if arguments is not None and not isinstance(arguments, dict):
            arguments, result = None, {"error": "the arguments must be a JSON object"}
        if arguments is None:
            pass
        elif name == ASK_HUMAN and ctx.input["ask_human"]:
            state["awaiting"] = tool_call.get("id")
            question = str(arguments.get("question") or "")
            ctx.progress(turn, max_turns, f"turn {turn}: ask_human asks: {_excerpt(question)}")
            return ctx.ask(question, ANSWER_SCHEMA, state, reason=ASK_HUMAN)
        elif name not in offered:
            result = {"error": f"no tool named {name!r} is available"}
        else:
            problems = schema_errors(offered[name].parameters, arguments, prefix="arguments")
            if problems:
                result = {
                    "error": "the arguments do not match the tool's parameters: "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in problems.items())
                }
            else:
                result = ctx.call_as(name, offered[name].tool, arguments)
        messages.append(
            {"role": "tool", "tool_call_id": tool_call.get("id"), "content": _content(result)}
        )
        ctx.progress(turn, max_turns, f"turn {turn}: {name} -> {_excerpt(result)}")
    return None


@agent("assistant", input_schema=INPUT_SCHEMA)
def assistant(ctx: StepContext, state: Any) -> Outcome:
    """A model drives the tools: one model turn per step, each tool call logged."""
    state = state or _initial_state(ctx.input)
    offered = _offered_tools(ctx.input)
    if state.get("awaiting"):  # the answer to ask_human is that call's result
        answer = (ctx.human_input or {}).get("answer", "")
        state["messages"].append(
            {"role": "tool", "tool_call_id": state["awaiting"], "content": str(answer)}
        )
        state["awaiting"] = None
    waiting = _run_pending(ctx, state, offered)
    if waiting is not None:
        return waiting
    max_turns = ctx.input["max_turns"]
    if state["turns"] >= max_turns:
        return ctx.fail(
            f"max_turns = {max_turns} reached: the model would need turn {max_turns + 1}",
            type="budget_exceeded",
        )
    tools = [o.schema for o in offered.values()]
    if ctx.input["ask_human"]:
        tools.append(ASK_HUMAN_TOOL)
    options = {"model": ctx.input["model"]} if ctx.input.get("model") else {}
    reply = ctx.llm(state["messages"], tools=tools or None, **options)
    state["turns"] += 1
    state["messages"].append(reply)
    calls = reply.get("tool_calls") or []
    if not calls:
        ctx.progress(state["turns"], max_turns, f"turn {state['turns']}: answered")
        return ctx.done(
            {
                "content": reply.get("content"),
                "turns": state["turns"],
                "messages": state["messages"],
            }
        )
    names = ", ".join(str((c.get("function") or {}).get("name")) for c in calls)
    ctx.progress(state["turns"], max_turns, f"turn {state['turns']}: calls {names}")
    state["pending"] = list(calls)
    waiting = _run_pending(ctx, state, offered)
    if waiting is not None:
        return waiting
    return ctx.next(state)
