"""Outlast's public Python package: the client for callers, the SDK for agent authors.

    from outlast import Client, verify_webhook                         # callers
    from outlast import agent, tool, RetryableError, AgentError        # agent authors

It needs ``requests`` and nothing of the server: the service itself (Flask, Celery,
PostgreSQL) is installed with ``pip install 'outlast[server]'``.
"""

from outlast.client import (
    APIError,
    Client,
    NetworkError,
    OutlastError,
    WaitTimeout,
)
from outlast.sdk import (
    NOT_FOUND,
    Agent,
    AgentError,
    Cancelled,
    Context,
    Continue,
    Done,
    Fail,
    Outcome,
    RetryableError,
    SleepUntil,
    SpawnRefused,
    Tool,
    ToolCall,
    TransientToolError,
    WaitForChildren,
    WaitForInput,
    agent,
    tool,
)
from outlast.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    # callers
    "Client",
    "verify_webhook",
    "WebhookVerificationError",
    "OutlastError",
    "APIError",
    "NetworkError",
    "WaitTimeout",
    # agent authors
    "agent",
    "tool",
    "Agent",
    "Tool",
    "ToolCall",
    "Context",
    "Outcome",
    "Continue",
    "Done",
    "WaitForInput",
    "SleepUntil",
    "WaitForChildren",
    "SpawnRefused",
    "Fail",
    "RetryableError",
    "TransientToolError",
    "AgentError",
    "Cancelled",
    "NOT_FOUND",
]
