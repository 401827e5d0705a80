"""The ``Prefer`` request header (RFC 7240) as far as Outlast honours it: ``wait=N``.

``Prefer: wait=N`` on ``POST /v1/tasks`` (V2.md section 3) asks for the answer to wait up
to N seconds (1 to 60) for the task to finish or ask for input. A preference Outlast
does not support, or ``wait`` out of range or not a whole number, is ignored, as RFC
7240 asks (never an error), and is not named in ``Preference-Applied``.
"""

from __future__ import annotations

from collections.abc import Iterable

WAIT_MIN_SECONDS = 1
WAIT_MAX_SECONDS = 60


def preferences(header_values: Iterable[str]) -> dict[str, str]:
    """Each preference's name (lower case) and value, from every ``Prefer`` header; the
    first instance of a preference counts (RFC 7240 section 2). Parameters after ``;``
    are dropped, quotes around a value removed."""
    found: dict[str, str] = {}
    for header in header_values:
        for item in header.split(","):
            name, _, value = item.partition(";")[0].partition("=")
            name = name.strip().lower()
            if name and name not in found:
                found[name] = value.strip().strip('"').strip()
    return found


def wait_seconds(header_values: Iterable[str]) -> int | None:
    """The ``wait`` preference in seconds when it is a whole number from 1 to 60, else
    ``None`` (ignored)."""
    value = preferences(header_values).get("wait", "")
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    seconds = int(value)
    return seconds if WAIT_MIN_SECONDS <= seconds <= WAIT_MAX_SECONDS else None


def applied_wait(seconds: int) -> str:
    """The ``Preference-Applied`` value of an honoured ``wait``."""
    return f"wait={seconds}"
