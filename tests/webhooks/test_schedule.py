"""The retry schedule of API.md: the n-th retry waits a random time between half and
all of base × 2^(n-1), capped at 3600 s; Retry-After parsing."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from app.webhooks.sender import parse_retry_after, retry_delay


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_nth_retry_waits_between_half_and_all_of_base_times_two_to_the_n_minus_one(n):
    rng = random.Random(n)
    ceiling = 5 * 2 ** (n - 1)
    delays = [retry_delay(n, 5, rng) for _ in range(2000)]
    assert min(delays) >= ceiling / 2
    assert max(delays) <= ceiling
    # Jittered over the whole range, not a constant.
    assert max(delays) - min(delays) > ceiling * 0.4


def test_retry_delays_are_capped_at_one_hour():
    rng = random.Random(0)
    delays = [retry_delay(n, 5, rng) for n in range(10, 200)]
    assert max(delays) <= 3600
    assert min(delays) >= 1800


def test_retries_are_numbered_from_one():
    with pytest.raises(ValueError):
        retry_delay(0, 5)


def test_retry_after_in_seconds_and_as_an_http_date():
    assert parse_retry_after("120") == 120
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 58 <= parse_retry_after(when) <= 61
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert parse_retry_after(past) == 0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
