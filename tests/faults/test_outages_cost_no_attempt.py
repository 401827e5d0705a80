"""Guarantee (V2.md 8 and 12): a database or broker outage costs a task no ``attempt``;
``attempt`` grows only when a worker is lost, and no worker exits for an outage.

The PostgreSQL and the Redis are this test's own, stopped for real while a step runs.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Client, new_tenant, query
from tests.harness import wait_until

pytestmark = pytest.mark.faults

OUTAGES = 5
# A lease long against each outage (a few seconds): the retry of the interrupted step
# comes back while its lease still holds, and takes it over.
LEASE = "15"


def _events(url: str, task_id: str) -> list[str]:
    rows = query(url, "SELECT type FROM events WHERE task_id = :t ORDER BY seq", t=task_id)
    return [r["type"] for r in rows]


def test_five_database_outages_during_one_task_leave_it_completing_with_attempt_1(
    private_postgres, stack, procs, watcher
):
    # Given the stack on a PostgreSQL of this test's own and a long echo task
    url = private_postgres.url
    stack.env.update({"DATABASE_URL": url, "OUTLAST_LEASE_SECONDS": LEASE})
    tenant = new_tenant(url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(url, stack.base_url, tenant.api_key)
    # (outage n comes at step 2n - 1, the last at step 9: 14 steps leave it mid-task)
    task = api.create("echo", {"message": "outages", "steps": 14, "step_seconds": 1.0})
    watcher.track(task["id"])

    # When PostgreSQL stops five times, each time in the middle of a step
    for n in range(OUTAGES):
        reached = wait_until(
            lambda n=n: (api.get(task["id"])["step"] >= 2 * n + 1) or None,
            60,
            0.2,
            what=f"step {2 * n + 1} before outage {n + 1}",
        )
        assert reached
        time.sleep(0.4)  # inside the step's one-second wait
        private_postgres.stop()
        time.sleep(2.0)
        private_postgres.start()

    # Then the task completes, on its first attempt, and no worker exited
    done = api.wait_terminal(task["id"], timeout=180)
    assert done["status"] == "completed", done
    assert done["attempt"] == 1, (done["attempt"], _events(url, task["id"]))
    assert "task.retrying" not in _events(url, task["id"])
    assert worker.alive() and "pool exited" not in worker.log_text(), procs.logs()


def test_redis_restart_mid_step_costs_no_attempt_and_no_worker_exits(
    private_redis, stack, procs, watcher, database_url
):
    # Given the stack on a Redis of this test's own, and a task in the middle of a step
    stack.env["REDIS_URL"] = private_redis.url
    tenant = new_tenant(database_url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)
    tasks = [
        api.create("echo", {"message": f"blip {i}", "steps": 4, "step_seconds": 2.0})["id"]
        for i in range(2)
    ]
    for task_id in tasks:
        watcher.track(task_id)
    wait_until(
        lambda: all(api.get(t)["status"] == "working" for t in tasks), 30, what="steps running"
    )
    time.sleep(0.5)

    # When Redis restarts (empty) while those steps run
    private_redis.stop()
    time.sleep(3.0)
    private_redis.start()

    # Then every task completes on its first attempt, and the worker never exited
    done = api.wait_all_terminal(tasks, timeout=120)
    assert {d["status"] for d in done.values()} == {"completed"}, done
    assert {d["attempt"] for d in done.values()} == {1}, {
        t: _events(database_url, t) for t in tasks
    }
    log = worker.log_text()
    assert worker.alive() and "pool exited" not in log, log[-4000:]
    assert "Unrecoverable error" not in log, log[-4000:]


def test_a_channel_holding_an_unacked_message_closes_after_its_transport_lost_redis(
    private_redis,
):
    """kombu 5.7's worker exit on Redis loss (docs/reliability.md), at the call that
    raised it: a channel still holding an unacknowledged message is closed after the
    connection dropped the transport's client (``Connection.collect`` does so even when
    closing the channels was cut short by a socket timeout). Stock kombu raises
    ``AttributeError: 'NoneType' object has no attribute 'hostname'`` from
    ``_connparams``, which ends the worker; the transport ``outlast worker`` uses skips
    the restore (Redis keeps the message in ``unacked``)."""
    from kombu import Connection, Exchange, Queue

    from workers.redis_transport import TRANSPORT

    # Given a consumer holding an unacknowledged message
    connection = Connection(private_redis.url, transport=TRANSPORT)
    queue = Queue("outage-restore", Exchange("outage-restore"), "outage-restore")
    with connection.Producer() as producer:
        producer.publish(
            {"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )
    channel = connection.channel()
    received = []
    consumer = connection.Consumer(
        queue, channel=channel, callbacks=[lambda _b, m: received.append(m)]
    )
    consumer.consume()
    connection.drain_events(timeout=5)
    assert len(received) == 1 and not received[0].acknowledged

    # When Redis goes away and the connection drops its transport's client first
    private_redis.stop()
    connection._do_close_transport()

    # Then closing the channel raises nothing
    channel.close()
    assert channel.closed


def test_acking_a_message_after_its_channel_closed_on_a_lost_redis_raises_nothing(
    private_redis,
):
    """The same fault reached through an ack (seen in the chaos run, bench/chaos.py): a
    thread-pool task that ends after Redis went away acknowledges its message through a
    channel the lost connection closed (``channel.connection`` is ``None``). Stock kombu
    raises ``AttributeError: 'NoneType' object has no attribute 'client'`` from
    ``_connparams``, which ended the side pool ("Unrecoverable error"); the ack is now
    skipped and the message stays in ``unacked``."""
    from kombu import Connection, Exchange, Queue

    from workers.redis_transport import TRANSPORT

    # Given a consumer holding two unacknowledged messages
    connection = Connection(private_redis.url, transport=TRANSPORT)
    queue = Queue("outage-ack", Exchange("outage-ack"), "outage-ack")
    with connection.Producer() as producer:
        for n in range(2):
            producer.publish(
                {"n": n}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
            )
    channel = connection.channel()
    channel.basic_qos(prefetch_count=2)
    received = []
    consumer = connection.Consumer(
        queue, channel=channel, callbacks=[lambda _b, m: received.append(m)]
    )
    consumer.consume()
    while len(received) < 2:
        connection.drain_events(timeout=5)

    # When Redis goes away, the connection drops its transport's client and the channel
    # is closed, and then the tasks that held the messages end
    private_redis.stop()
    connection._do_close_transport()
    channel.close()
    assert channel.connection is None

    # Then acknowledging or rejecting them raises nothing
    received[0].ack()
    received[1].reject(requeue=True)


def test_a_pool_that_exits_is_started_again_inside_outlast_worker(
    stack, procs, watcher, database_url
):
    import psutil

    # Given the stack, and the Celery worker running the steps inside `outlast worker`
    tenant = new_tenant(database_url)
    web, worker, beat = procs.start("web", "worker", "beat")
    api = Client(stack.base_url, tenant.api_key)
    watcher.start(database_url, stack.base_url, tenant.api_key)

    def supervisor() -> psutil.Process:
        # The Procfile line runs in a shell: the `outlast worker` process under it.
        shell = psutil.Process(worker.pid)
        return next(p for p in [shell, *shell.children(recursive=True)] if _name(p) == "outlast")

    def steps_pool() -> psutil.Process | None:
        for child in supervisor().children():
            try:
                if "steps" in child.cmdline():
                    return child
            except psutil.Error:  # the killed one, until the supervisor reaps it
                continue
        return None

    first = steps_pool()
    assert first is not None, supervisor().children()

    # When that pool's main process dies (as kombu 5.7 could make it exit)
    first.kill()

    # Then `outlast worker` stays up, says so, and starts the pool again
    again = wait_until(
        lambda: (p := steps_pool()) is not None and p.pid != first.pid and p, 30, what="restart"
    )
    assert worker.alive() and "the steps pool exited" in worker.log_text()
    wait_until(
        lambda: "ready." in worker.log_text().split("the steps pool exited")[-1],
        60,
        what="the new pool ready",
    )
    task = api.create("echo", {"message": "after the restart"})["id"]
    watcher.track(task)
    done = api.wait_terminal(task, timeout=60)
    assert done["status"] == "completed" and done["attempt"] == 1, done
    assert again.is_running()


def _name(process) -> str | None:
    import psutil

    try:
        return process.name()
    except psutil.Error:
        return None
