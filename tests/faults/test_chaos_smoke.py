"""The chaos run (bench/chaos.py) at its smallest: a short run with every kind of fault
(worker SIGKILLs, beat SIGKILLed and restarted, two beats overlapping, Redis and
PostgreSQL stopped and started again) still loses, strands and duplicates nothing.

The faults come closer together than in the full run (a kill every 6 s), so recovery
times are not checked here: the figures of the full-size run are in docs/reliability.md.
"""

from __future__ import annotations

import json

import pytest

from bench import chaos

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# Correctness only: recovery against the promise needs the full run's spacing.
CHECKED = (
    "no_task_lost",
    "no_task_stuck",
    "no_duplicated_call",
    "no_missing_call",
    "no_status_regression",
    "every_hook_delivered_once_in_effect",
    "tarpit_cut_and_capped",
)


def test_a_small_chaos_run_loses_strands_and_duplicates_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    chaos.main(
        ["--tasks", "30", "--cycle", "5", "--kill-every", "6", "--tarpit-every", "3"]
        + ["--grace", "90", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["accepted"] == 30, result["submit_errors"]
    assert set(result["faults"]) == {
        "kill",
        "beat_restart",
        "beat_overlap",
        "beat_overlap_end",
        "redis",
        "postgres",
    }, result["timeline"]
    assert result["interrupted_tasks"] >= 1, result["timeline"]
    failed = {name: result["verdict"][name] for name in CHECKED if not result["verdict"][name]}
    assert not failed, (failed, result["examples"])
