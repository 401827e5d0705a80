"""A scripted OpenAI-compatible ``/chat/completions`` (the provider is the only fake):
turn ``n`` of a conversation (``n`` = assistant messages in the request so far) gets
the script's ``n``-th answer, so a repeated request gets the same answer."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from tests.engine.servers import LocalServer, Received, json_answer

PROMPT_TOKENS = 10
COMPLETION_TOKENS = 5


def tool_call(call_id: str, name: str, **arguments: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def asks(*calls: dict[str, Any]) -> dict[str, Any]:
    """A model turn that asks for these tool calls."""
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def says(content: str) -> dict[str, Any]:
    """A model turn that answers."""
    return {"role": "assistant", "content": content}


class ScriptedModel:
    """``script[n]`` answers turn ``n`` (a message, or a function of the request giving
    one); past the end, the last entry answers."""

    def __init__(self, script: Sequence[dict[str, Any] | Callable[[Received], dict[str, Any]]]):
        self.script = list(script)
        self.server = LocalServer(self.handle)

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def handle(self, request: Received):
        body = request.json
        turn = sum(1 for m in body["messages"] if m.get("role") == "assistant")
        entry = self.script[min(turn, len(self.script) - 1)]
        message = entry(request) if callable(entry) else entry
        return json_answer(
            200,
            {
                "id": f"chatcmpl-{turn}",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": COMPLETION_TOKENS,
                    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                },
            },
        )

    def requests_for(self, task_messages_prefix: str) -> list[Received]:
        """The requests whose first user message starts with ``task_messages_prefix``."""
        found = []
        for r in list(self.server.requests):
            users = [m for m in r.json["messages"] if m.get("role") == "user"]
            if users and str(users[0].get("content", "")).startswith(task_messages_prefix):
                found.append(r)
        return found

    def close(self) -> None:
        self.server.close()
