"""Guarantee: a client that retries a submission whose answer it lost gets the same task.

RUNTIME.md: "client retries a submission (lost 202): the same task, by Idempotency-Key".
The 202 is lost for real: a proxy between client and web forwards the request, lets the
web process commit and answer, and cuts the client's connection instead of passing the
answer on.
"""

from __future__ import annotations

import pytest
import requests

from tests.faults.conftest import Client, new_tenant, query
from tests.faults.proxy import LossyProxy

pytestmark = pytest.mark.faults


@pytest.fixture
def proxy(stack):
    proxies = []

    def make(upstream: str) -> LossyProxy:
        proxies.append(LossyProxy(upstream))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def test_retry_after_a_lost_202_returns_the_same_task_and_runs_it_once(
    stack, procs, proxy, ledger, watcher, database_url
):
    # Given the stack behind a proxy that will lose the next two answers
    tenant = new_tenant(database_url)
    procs.start("web", "worker", "beat")
    lossy = proxy(stack.base_url)
    api = Client(lossy.url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    body = {"url": ledger.url + "/calls", "calls": 2}
    lossy.lose_next(2)

    # When the client submits, hears nothing, and retries with the same key, twice
    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            api.submit("calls", body, idempotency_key="lost-202")
    first, second = lossy.lost
    assert (first.status_code, second.status_code) == (202, 202)
    answer = api.submit("calls", body, idempotency_key="lost-202")

    # Then the answer it finally gets is the task the first request created
    assert answer.status_code == 202, answer.text
    assert answer.json()["id"] == first.json()["id"] == second.json()["id"]
    assert answer.headers.get("Idempotent-Replayed") == "true"
    watcher.track(answer.json()["id"])
    # and that task is the only one, and runs once
    assert len(query(database_url, "SELECT id FROM tasks")) == 1
    done = api.wait_terminal(answer.json()["id"], timeout=60)
    assert done["status"] == "completed", done
    counts = ledger.counts("/calls", done["id"])
    assert len(counts) == 2 and set(counts.values()) == {1}, counts
