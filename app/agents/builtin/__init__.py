"""The built-in agents of spec/RUNTIME.md (echo, calls, approval, research, sleepy) and
V2.md (assistant, fanout), and the built-in tools they use (``http_get``, ``http_post``,
``llm``, and ``calls_undo``, the compensation of the ``calls`` agent's POSTs).

The registry collects the agent and tool objects named here (this package is also the
``builtin`` entry point of the ``outlast.agents`` group).
"""

from app.agents.builtin.approval import approval
from app.agents.builtin.assistant import assistant
from app.agents.builtin.assistant import check_input as check_assistant_input
from app.agents.builtin.calls import calls, calls_undo
from app.agents.builtin.echo import echo
from app.agents.builtin.fanout import check_input as check_fanout_input
from app.agents.builtin.fanout import fanout
from app.agents.builtin.research import research
from app.agents.builtin.sleepy import sleepy
from app.engine.http_tools import http_get, http_post
from app.engine.llm import llm

# Submission checks beyond an agent's JSON Schema, by agent name (``422`` ``errors``).
INPUT_CHECKS = {"assistant": check_assistant_input, "fanout": check_fanout_input}

__all__ = [
    "INPUT_CHECKS",
    "assistant",
    "approval",
    "calls",
    "calls_undo",
    "echo",
    "fanout",
    "research",
    "sleepy",
    "http_get",
    "http_post",
    "llm",
]
