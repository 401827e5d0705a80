"""The one backoff policy: exponential, capped, optionally jittered.

Every retry loop of Outlast, client and server, is a named use of :class:`Backoff`
(step retries, database retries, webhook retries, the client's waits and retries, the
HTTP tools' retries), so the arithmetic is written once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """The ``n``-th retry (numbered from 1) waits ``base × factor^(n-1)`` seconds, at most
    ``cap``; with ``jitter``, a uniformly random time between half and all of that."""

    base: float
    cap: float
    jitter: bool = False
    factor: float = 2.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 after the first failure)."""
        if retry < 1:
            raise ValueError("retries are numbered from 1")
        # min() on the exponent first: a large retry number must not overflow.
        ceiling = min(self.base * self.factor ** min(retry - 1, 64), self.cap)
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(ceiling / 2, ceiling)
