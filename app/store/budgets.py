"""Budgets (V2.md section 3) and usage (section 1) as plain values.

``tasks.usage`` is what a task really spent; it grows only when a call's ``completed``
row is written (:func:`app.store.tool_calls.complete`), so a call replayed from the log
is never counted twice. ``tasks.budget`` is the submitted budget with ``on_exhausted``
filled in and extensions applied. The worker checks the budget against the recorded
usage before each model call, each tool call and each step (:func:`refusal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.errors import ValidationFailed

LIMITS = ("max_model_calls", "max_tool_calls", "max_total_tokens", "max_steps")
ON_EXHAUSTED = ("fail", "ask")
ERROR_TYPE = "budget_exceeded"
EMPTY_USAGE = {"model_calls": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0}
# The ``llm`` tool is a model call; every other logged tool is a tool call.
MODEL_TOOL = "llm"

# What the worker is about to do, as a budget sees it.
MODEL_CALL = "model_call"
TOOL_CALL = "tool_call"
STEP = "step"

ASK_SCHEMA = {
    "type": "object",
    "properties": {"extend": {"type": "object"}, "stop": {"type": "boolean"}},
}
ASK_REASON = "budget"
PROMPT_PREFIX = "budget exhausted: "


def normalized(budget: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The budget as stored: the limits given, ``on_exhausted`` filled in."""
    if budget is None:
        return None
    stored = {k: budget[k] for k in LIMITS if budget.get(k) is not None}
    stored["on_exhausted"] = budget.get("on_exhausted") or "fail"
    return stored


def refusal(
    action: str, budget: Mapping[str, Any] | None, usage: Mapping[str, Any], step: int = 0
) -> tuple[str, int] | None:
    """``(limit, value)`` when ``action`` would go past ``budget`` given ``usage``
    (``step``: steps completed so far, for :data:`STEP`), else ``None``."""
    if not budget:
        return None
    if action == MODEL_CALL:
        limit = budget.get("max_model_calls")
        if limit is not None and usage.get("model_calls", 0) >= limit:
            return "max_model_calls", limit
        limit = budget.get("max_total_tokens")
        spent = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
        if limit is not None and spent >= limit:
            return "max_total_tokens", limit
    elif action == TOOL_CALL:
        limit = budget.get("max_tool_calls")
        if limit is not None and usage.get("tool_calls", 0) >= limit:
            return "max_tool_calls", limit
    elif action == STEP:
        limit = budget.get("max_steps")
        if limit is not None and step >= limit:
            return "max_steps", limit
    return None


def message(limit: str, value: int) -> str:
    """The error message and the input prompt naming the limit."""
    return f"{PROMPT_PREFIX}{limit} = {value}"


def ask_request(limit: str, value: int) -> dict[str, Any]:
    """The ``input_request`` of a task whose budget says ``"ask"``."""
    return {"prompt": message(limit, value), "reason": ASK_REASON, "schema": ASK_SCHEMA}


def is_budget_request(input_request: Mapping[str, Any] | None) -> bool:
    return bool(input_request) and input_request.get("reason") == ASK_REASON


def extended(budget: Mapping[str, Any] | None, extend: Any) -> dict[str, Any]:
    """``budget`` with the limits in ``extend`` set to their new values.

    Raises :class:`ValidationFailed` (``422``) naming ``input.extend.<key>`` for an
    unknown limit or a value that is not an integer of at least 1.
    """
    errors: dict[str, list[str]] = {}
    if not isinstance(extend, Mapping):
        raise ValidationFailed({"input.extend": ["must be an object"]})
    for key, value in extend.items():
        if key not in LIMITS:
            errors[f"input.extend.{key}"] = [f"is not a budget limit (one of {', '.join(LIMITS)})"]
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors[f"input.extend.{key}"] = ["must be an integer of at least 1"]
    if errors:
        raise ValidationFailed(errors, "The budget extension is not valid.")
    updated = dict(budget or {"on_exhausted": "ask"})
    updated.update(extend)
    return updated


def added(usage: Mapping[str, Any], name: str, output: Any) -> dict[str, int]:
    """``usage`` plus one completed call of tool ``name`` with ``output``."""
    total = {k: int(usage.get(k, 0) or 0) for k in EMPTY_USAGE}
    if name == MODEL_TOOL:
        total["model_calls"] += 1
        reported = output.get("usage") if isinstance(output, Mapping) else None
        reported = reported if isinstance(reported, Mapping) else {}
        total["input_tokens"] += _tokens(reported.get("prompt_tokens"))
        total["output_tokens"] += _tokens(reported.get("completion_tokens"))
    else:
        total["tool_calls"] += 1
    return total


def _tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(value)
