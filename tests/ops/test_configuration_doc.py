"""docs/operations.md's configuration table and app/settings.py say the same thing.

A deployer reads the table, not the code: a variable the code reads but the table omits
is a knob nobody can find, and a default the table gets wrong is a surprise in
production. No servers needed: both sides are read as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_SOURCE = (ROOT / "app" / "settings.py").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()

# Defaults that depend on the machine or mean "absent": described, not a value to set.
DESCRIBED = {"embedded", "CPU count", "unset", "empty"}


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def _table() -> dict[str, str]:
    """variable -> default, as the Configuration section states them."""
    rows = {}
    for line in _section(OPERATIONS, "Configuration").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def _read_by_settings() -> set[str]:
    """Every environment variable Settings.from_env reads."""
    body = SETTINGS_SOURCE[SETTINGS_SOURCE.index("def from_env") :]
    return set(re.findall(r'"((?:OUTLAST_|WEB_)[A-Z_]+|DATABASE_URL|REDIS_URL|PORT)"', body))


def test_every_variable_settings_reads_is_in_the_table_and_nothing_else_is():
    read, documented = _read_by_settings(), set(_table())
    assert len(read) >= 30  # the pattern still finds the variables
    assert read - documented == set(), "read by app/settings.py, missing from the table"
    assert documented - read == set(), "in the table, not read by app/settings.py"


def test_each_default_is_a_value_or_says_why_it_has_none():
    for name, default in _table().items():
        assert default in DESCRIBED or re.fullmatch(r"`[^`]*`( \(.*\))?", default), name


@pytest.mark.parametrize("name", sorted(n for n, d in _table().items() if d not in DESCRIBED))
def test_a_documented_default_set_explicitly_changes_nothing(name):
    value = re.match(r"`([^`]*)`", _table()[name]).group(1)
    assert Settings.from_env({name: value}) == Settings.from_env({})
