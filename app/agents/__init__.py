"""Agents: the SDK an agent author uses, the registry, the built-in agents and tools."""

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

__all__ = [
    "Agent",
    "AgentError",
    "Cancelled",
    "Continue",
    "Done",
    "Fail",
    "Outcome",
    "RetryableError",
    "SleepUntil",
    "WaitForInput",
    "agent",
    "get_agent",
    "validate_input",
]
