"""The step context (placeholder while the engine is written)."""

from __future__ import annotations


class StepContext:
    """What a step function receives; see docs/agents.md."""
