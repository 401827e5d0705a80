"""Fixtures for the webhook tests: per-test settings, a local receiver, beat."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dev.processes import ManagedProcess
from tests.conftest import ROOT, TEST_ENV
from tests.harness import read_procfile, wait_until
from tests.webhooks.receiver import Receiver, Responder


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "webhook_env(**vars): environment overrides for one webhook test"
    )


@pytest.fixture
def env(env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    """The suite's test environment plus this test's ``webhook_env`` overrides."""
    marker = request.node.get_closest_marker("webhook_env")
    return {**env, **(marker.kwargs if marker else {})}


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for r in started:
        r.stop()


@pytest.fixture
def make_receiver(receivers: list[Receiver]):
    """``make_receiver(respond)``: a started local receiver, stopped after the test."""

    def make(respond: Responder | None = None) -> Receiver:
        r = Receiver(respond).start()
        receivers.append(r)
        return r

    return make


# The session's beat once started (tests that kill their own beat pause it).
_session_beats: list[ManagedProcess] = []


@pytest.fixture(scope="session")
def session_beat(servers, tmp_path_factory) -> Iterator[ManagedProcess]:
    """The Procfile's beat as a real process, started once for these tests.

    Beat only publishes sweep messages to the session's Redis (it never opens the
    database), so one beat serves every test: each test's worker consumes the sweeps
    against that test's database. Starting beat takes seconds; doing it per test would
    dominate the run. Tests that need their own beat (to kill it) use ``stack``.
    """
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        **TEST_ENV,
        "REDIS_URL": servers.redis_url,
        # Never used by beat; pointing nowhere keeps it off the template database.
        "DATABASE_URL": "postgresql://outlast@127.0.0.1:9/unused",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
    }
    proc = ManagedProcess(
        "beat.session",
        read_procfile(ROOT)["beat"],
        env=env,
        cwd=ROOT,
        log_path=tmp_path_factory.mktemp("beat") / "beat.log",
    ).start()
    _session_beats.append(proc)
    try:
        wait_until(lambda: "beat: Starting" in proc.log_text(), 60, what="beat started")
        yield proc
    finally:
        _session_beats.remove(proc)
        proc.stop()


@pytest.fixture
def only_own_beats() -> Iterator[None]:
    """Pause the session's beat (if running) so that the only beats are the test's own."""
    for proc in _session_beats:
        proc.signal_group(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in _session_beats:
            proc.signal_group(signal.SIGCONT)


@pytest.fixture
def beat(session_beat: ManagedProcess, celery_worker) -> ManagedProcess:
    """Beat's sweeps reaching this test's worker (which re-declares the queues that the
    per-test Redis flush removed)."""
    assert session_beat.alive(), session_beat.log_text()[-2000:]
    return session_beat
