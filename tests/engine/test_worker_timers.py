"""The prefork pool's main process keeps no cancelled time-limit timers around: every
step's soft and hard time-limit timers (3900 s / 4000 s) are cancelled when the step
ends, and kombu leaves a cancelled entry in its timer heap until its time comes, so
without the purge the main process grew by ~0.7 KB a step for 65 minutes
(docs/benchmarks.md, worker memory)."""

from __future__ import annotations

from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Timer

from workers.signals import purge_cancelled_timers


def test_cancelled_time_limit_timers_are_purged_and_live_ones_kept():
    # Given a hub's timer holding the time limits of 1,000 finished steps and of one
    # step still running, as the prefork pool schedules them
    timer = Timer()
    hub = Hub(timer)
    finished = [hub.call_later(3900, lambda: None) for _ in range(1000)]
    running = hub.call_later(3900, lambda: None)
    for entry in finished:
        entry.cancel()
    assert len(timer) == 1001  # kombu keeps cancelled entries until their time comes

    # When the purge runs
    dropped = purge_cancelled_timers(timer)

    # Then only the running step's timer is left, and it still fires in order
    assert dropped == 1000
    assert len(timer) == 1
    assert timer._queue[0][2] is running
    assert purge_cancelled_timers(timer) == 0
