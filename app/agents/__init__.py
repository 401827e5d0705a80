"""Agents: the SDK an agent author uses, the registry, the built-in agents and tools."""

from app.agents.context import StepContext
from app.agents.registry import get_agent, validate_input
from app.agents.sdk import (
    Agent,
    AgentError,
    Cancelled,
    Continue,
    Done,
    Fail,
    Outcome,
    RetryableError,
    SleepUntil,
    WaitForInput,
    agent,
)
from app.agents.tools import NOT_FOUND, ToolCall, TransientToolError, tool

__all__ = [
    "NOT_FOUND",
    "Agent",
    "AgentError",
    "Cancelled",
    "Continue",
    "Done",
    "Fail",
    "Outcome",
    "RetryableError",
    "SleepUntil",
    "StepContext",
    "ToolCall",
    "TransientToolError",
    "WaitForInput",
    "agent",
    "get_agent",
    "tool",
    "validate_input",
]
