"""Opaque, time-ordered identifiers: ``tsk_``, ``evt_``, ``dlv_``, ``ten_``, ``key_``."""

from __future__ import annotations

import base64
import os
import secrets
import time


def new_id(prefix: str) -> str:
    """``prefix_`` + 26 base32 characters: 48 bits of milliseconds, then 80 random bits.

    Ids made later sort later, which keeps index inserts at the right edge.
    """
    raw = int(time.time() * 1000).to_bytes(6, "big") + os.urandom(10)
    return f"{prefix}_{base64.b32encode(raw).decode().lower().rstrip('=')}"


def new_token() -> str:
    """A fencing token for a step lease."""
    return secrets.token_hex(12)
