"""Model calls for ``ctx.llm``: an OpenAI-compatible Chat Completions client with tool
calling, and a deterministic offline model used when no endpoint is configured.

Both are reached through the ``llm`` tool, so every completion is written to the
tool-call log and replayed (never paid for twice) when a step is re-run after a crash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import requests

from app import settings as settings_mod
from outlast.sdk import AgentError, ToolCall, TransientToolError, tool

TIMEOUT_SECONDS = 120.0
OFFLINE_MODEL = "outlast-offline-1"


class ChatCompletionsClient:
    """``POST {base_url}/chat/completions`` (OpenAI wire format)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str | None,
        timeout: float = TIMEOUT_SECONDS,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout

    def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """One completion: ``{"message", "finish_reason", "usage", "model"}``.

        Connection errors, timeouts, 429 and 5xx raise :class:`TransientToolError` (the
        step is retried); other errors raise :class:`AgentError`.
        """
        body: dict[str, Any] = {"messages": list(messages), **options}
        body.setdefault("model", self.model or "gpt-4o-mini")
        if tools:
            body["tools"] = list(tools)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if key:
            headers["Idempotency-Key"] = key  # honoured by some gateways; harmless elsewhere
        try:
            response = requests.post(
                f"{self.base_url}/chat/completions",
                json=body,
                headers=headers,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise TransientToolError(
                f"model endpoint unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientToolError(f"model endpoint answered {response.status_code}")
        if response.status_code >= 400:
            raise AgentError(
                f"model endpoint answered {response.status_code}: {response.text[:500]}"
            )
        try:
            data = response.json()
            choice = data["choices"][0]
            message = dict(choice["message"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise AgentError(
                f"model endpoint returned no completion: {response.text[:500]}"
            ) from exc
        message.setdefault("role", "assistant")
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
        return {
            "message": message,
            "finish_reason": choice.get("finish_reason"),
            "usage": data.get("usage"),
            "model": data.get("model", body["model"]),
        }


class OfflineModel:
    """A deterministic stand-in for a model: the same messages always get the same
    answer, so every built-in agent runs without network.

    Offered ``tools``, it calls each tool it has not called since the last user message,
    all in one turn, with arguments built from the tool's schema (each required
    parameter: the user's last message for a string, ``1`` for a number, ``true``,
    ``[]``, ``{}``, or an enum's first value); once every tool has answered, or with
    no tools, it answers with a short digest of the question and the tool results.
    It reports token counts of its own (about four characters a token).
    """

    def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        prompt = json.dumps(list(messages), sort_keys=True, default=str)
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        user_index = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        user_text = str(messages[user_index].get("content") or "") if user_index >= 0 else ""
        called = {
            (c.get("function") or {}).get("name")
            for m in messages[user_index + 1 :]
            if m.get("role") == "assistant"
            for c in m.get("tool_calls") or []
        }
        to_call = [
            dict(t.get("function") or {})
            for t in tools or []
            if (t.get("function") or {}).get("name") not in called
        ]
        if to_call:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{digest[:16]}_{i}",
                        "type": "function",
                        "function": {
                            "name": function.get("name", "tool"),
                            "arguments": json.dumps(
                                _arguments(function.get("parameters") or {}, user_text)
                            ),
                        },
                    }
                    for i, function in enumerate(to_call)
                ],
            }
            finish = "tool_calls"
        else:
            message = {
                "role": "assistant",
                "content": _digest_answer(user_text, messages[user_index + 1 :]),
            }
            finish = "stop"
        prompt_tokens = _token_count(prompt)
        completion_tokens = _token_count(json.dumps(message, sort_keys=True))
        return {
            "message": message,
            "finish_reason": finish,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "model": OFFLINE_MODEL,
        }


def _token_count(text: str) -> int:
    return (len(text) + 3) // 4


_PLACEHOLDERS: dict[str, Any] = {
    "integer": 1,
    "number": 1,
    "boolean": True,
    "array": [],
    "object": {},
    "null": None,
}


def _arguments(parameters: Mapping[str, Any], user_text: str) -> dict[str, Any]:
    """Arguments for a tool call: a value for each required parameter."""
    properties = parameters.get("properties") or {}
    arguments: dict[str, Any] = {}
    for name in parameters.get("required") or []:
        prop = properties.get(name) or {}
        if prop.get("enum"):
            arguments[name] = prop["enum"][0]
            continue
        kind = prop.get("type", "string")
        if isinstance(kind, list):
            kind = kind[0] if kind else "string"
        arguments[name] = _PLACEHOLDERS.get(kind, user_text) if kind != "string" else user_text
    return arguments


def _digest_answer(user_text: str, after: Sequence[Mapping[str, Any]]) -> str:
    lines = [line.strip() for line in user_text.splitlines() if line.strip()]
    head = lines[0] if lines else "(no question)"
    cited = [line for line in lines[1:] if line.startswith("[")][:10]
    tool_results = [str(m.get("content") or "")[:200] for m in after if m.get("role") == "tool"]
    parts = [f"Offline model answer (no OUTLAST_LLM_BASE_URL configured). {head}"]
    if cited:
        parts.append("Sources considered: " + "; ".join(cited))
    if tool_results:
        parts.append("Tool results: " + "; ".join(tool_results))
    return "\n".join(parts)


def client(settings: settings_mod.Settings | None = None) -> ChatCompletionsClient | OfflineModel:
    """The configured model endpoint, or the offline model when none is set."""
    cfg = settings or settings_mod.current()
    if cfg.llm_base_url:
        return ChatCompletionsClient(cfg.llm_base_url, cfg.llm_api_key, cfg.llm_model)
    return OfflineModel()


def _summarize(args: Mapping[str, Any]) -> dict[str, Any]:
    """What the log keeps of a model request: its size and a digest, not the prompt."""
    messages = args.get("messages") or []
    return {
        "messages": len(messages),
        "tools": [((t.get("function") or {}).get("name")) for t in args.get("tools") or []],
        "sha256": hashlib.sha256(
            json.dumps(args, sort_keys=True, default=str).encode()
        ).hexdigest(),
    }


@tool("llm", summarize=_summarize)
def llm(
    call: ToolCall, messages: Sequence[Mapping[str, Any]], tools: Any = None, **options: Any
) -> dict[str, Any]:
    """The model call behind ``ctx.llm``."""
    return client().complete(messages, tools, key=call.key, **options)
