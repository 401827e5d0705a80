"""The built-in agents of spec/RUNTIME.md: echo, calls, approval, research, sleepy.

Importing this package registers them (it is also the ``builtin`` entry point of the
``outlast.agents`` group).
"""

from app.agents import http, llm  # noqa: F401  (registers the built-in tools)
from app.agents.builtin import approval, calls, echo, research, sleepy

__all__ = ["approval", "calls", "echo", "research", "sleepy"]
