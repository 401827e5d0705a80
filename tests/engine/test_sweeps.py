"""The beat's sweeps against real PostgreSQL and Redis (no worker: the tests look at the
rows and messages a sweep leaves behind)."""

from __future__ import annotations

import json
import threading

import redis as redis_lib

from app.engine import sweeps
from app.store import db, ids, lifecycle, messages, outbox


def step_queue_keys(client) -> list[bytes]:
    """The legacy ``steps`` queue and every per-version step queue (``steps:*``)."""
    return [k for k in client.scan_iter(match="steps*") if not k.startswith(b"steps\x06")]


def queued_steps(redis_url: str) -> int:
    """Step messages waiting, in every step queue."""
    client = redis_lib.Redis.from_url(redis_url)
    try:
        return sum(client.llen(k) for k in step_queue_keys(client))
    finally:
        client.close()


def lose_step_messages(redis_url: str, queue: str | None = None) -> None:
    """What a Redis flush does to the step queues (all, or only ``queue``)."""
    client = redis_lib.Redis.from_url(redis_url)
    try:
        keys = [queue] if queue else step_queue_keys(client)
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def take_lease_and_vanish(tasks, task_id: str) -> None:
    """What a worker SIGKILLed mid-step leaves: a lease that is never renewed."""
    with db.transaction() as conn:
        assert lifecycle.acquire_lease(conn, task_id, 0, ids.new_token(), 0.01) is not None
    tasks.scalar("SELECT pg_sleep(0.05)")


def test_reaper_resumes_an_expired_lease_with_the_next_attempt(flask_app, tasks, redis_url):
    task_id = tasks.submit("echo", {"message": "x"})
    take_lease_and_vanish(tasks, task_id)
    before = queued_steps(redis_url)

    assert sweeps.reap_expired_leases() == 1

    task = tasks.get(task_id)
    assert task["status"] == "working" and task["attempt"] == 2 and task["lease_token"] is None
    assert tasks.event_types(task_id)[-1] == "task.retrying"
    assert queued_steps(redis_url) == before + 1  # a new message for the same step
    assert sweeps.reap_expired_leases() == 0


def test_reaper_fails_the_last_attempt_with_worker_lost(flask_app, tasks, settings):
    task_id = tasks.submit("echo", {"message": "x"})
    tasks.scalar(
        "UPDATE tasks SET attempt = :max WHERE id = :id RETURNING 1",
        id=task_id,
        max=settings.max_attempts,
    )
    take_lease_and_vanish(tasks, task_id)

    sweeps.reap_expired_leases()

    task = tasks.get(task_id)
    assert task["status"] == "failed"
    assert task["error"]["type"] == "worker_lost"


def test_two_reapers_at_once_reclaim_each_lease_exactly_once(flask_app, tasks):
    task_ids = [tasks.submit("echo", {"message": str(i)}) for i in range(30)]
    for task_id in task_ids:
        take_lease_and_vanish(tasks, task_id)
    counts: list[int] = []
    start = threading.Barrier(2)

    def reap() -> None:
        start.wait()
        counts.append(sweeps.reap_expired_leases())

    threads = [threading.Thread(target=reap) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sum(counts) == 30
    attempts = tasks.rows("SELECT attempt FROM tasks WHERE id = ANY(:ids)", ids=task_ids)
    assert {r["attempt"] for r in attempts} == {2}
    retrying = tasks.scalar(
        "SELECT count(*) FROM events WHERE type = 'task.retrying' AND task_id = ANY(:ids)",
        ids=task_ids,
    )
    assert retrying == 30


def test_lost_message_sweep_resends_only_what_the_queue_lacks(flask_app, tasks, redis_url):
    # Given: every worker is down; 5 tasks wait with their messages queued for an hour
    task_ids = [tasks.submit("echo", {"message": str(i)}) for i in range(5)]
    tasks.scalar("UPDATE tasks SET dispatched_at = now() - interval '1 hour' RETURNING 1")
    assert queued_steps(redis_url) == 5

    # Then nothing is re-sent: they are queued, not lost (no flood of duplicates)
    assert sweeps.redispatch_lost_messages() == 0
    assert queued_steps(redis_url) == 5

    # When Redis loses the messages
    lose_step_messages(redis_url)

    # Then each task gets one new message, and a second sweep adds none
    assert sweeps.redispatch_lost_messages() == 5
    assert queued_steps(redis_url) == 5
    tasks.scalar("UPDATE tasks SET dispatched_at = now() - interval '1 hour' RETURNING 1")
    assert sweeps.redispatch_lost_messages() == 0
    assert {r["status"] for r in tasks.rows("SELECT status::text FROM tasks")} == {"pending"}
    assert len(task_ids) == 5


def test_lost_message_sweep_counts_each_agent_version_against_its_own_queue(
    flask_app, tasks, redis_url
):
    # Given: tasks of two versions waiting, each queue holding one message per task
    # (version 2 has no worker at all: its queue fills and stays, for days if need be)
    v1 = [tasks.submit("echo", {"message": str(i)}) for i in range(3)]
    v2 = [tasks.submit("echo", {"message": str(i)}) for i in range(2)]
    tasks.scalar("UPDATE tasks SET agent_version = '2' WHERE id = ANY(:ids) RETURNING 1", ids=v2)
    lose_step_messages(redis_url)
    for task_id in v2:  # the outbox routes by the version the task is on now
        with db.transaction() as conn:
            outbox.add_step(conn, task_id, 0)
    with db.transaction() as conn:
        outbox.add_step(conn, v1[0], 0)
    tasks.scalar("UPDATE tasks SET dispatched_at = now() - interval '1 hour' RETURNING 1")
    client = redis_lib.Redis.from_url(redis_url)
    assert client.llen(messages.step_queue("echo", "2")) == 2
    assert client.llen(messages.step_queue("echo", "1")) == 1

    # Then only the two v1 messages that are missing are re-sent, to version 1's queue
    assert sweeps.redispatch_lost_messages() == 2
    assert client.llen(messages.step_queue("echo", "1")) == 3
    assert client.llen(messages.step_queue("echo", "2")) == 2

    # And a message still in the legacy steps queue counts as queued: nothing is re-sent
    lose_step_messages(redis_url, messages.step_queue("echo", "1"))
    for task_id in v1:
        outbox.publish([outbox.PendingMessage(0, messages.RUN_STEP, "steps", [task_id, 0])])
    tasks.scalar("UPDATE tasks SET dispatched_at = now() - interval '1 hour' RETURNING 1")
    assert client.llen("steps") == 3
    assert sweeps.redispatch_lost_messages() == 0
    client.close()


def test_recently_dispatched_tasks_are_not_counted_lost(flask_app, tasks, redis_url):
    tasks.submit("echo", {"message": "fresh"})
    lose_step_messages(redis_url)

    assert sweeps.redispatch_lost_messages() == 0  # younger than lost_after_seconds


def test_expired_keys_and_long_acknowledged_tasks_are_purged(settings, tasks, tenant):
    old_done = tasks.submit("echo", {"message": "old"})
    recent_done = tasks.submit("echo", {"message": "recent"})
    old_active = tasks.submit("echo", {"message": "still running"})
    with db.transaction() as conn:
        for task_id in (old_done, recent_done):
            lifecycle.cancel(conn, task_id, tenant.tenant_id)
    tasks.scalar(
        "UPDATE tasks SET finished_at = now() - interval '31 days', "
        "created_at = now() - interval '31 days' WHERE id IN (:a, :b) RETURNING 1",
        a=old_done,
        b=old_active,
    )
    tasks.scalar(
        "UPDATE tasks SET acknowledged_at = finished_at WHERE id IN (:a, :b) RETURNING 1",
        a=old_done,
        b=recent_done,
    )
    tasks.scalar(
        "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, expires_at) VALUES "
        "(:t, 'gone', 'f', now() - interval '1 second'), "
        "(:t, 'kept', 'f', now() + interval '1 hour') RETURNING 1",
        t=tenant.tenant_id,
    )

    assert sweeps.purge_old_tasks() == 1
    assert sweeps.expire_idempotency_keys() == 1

    remaining = {r["id"] for r in tasks.rows("SELECT id FROM tasks")}
    assert remaining == {recent_done, old_active}
    assert [r["key"] for r in tasks.rows("SELECT key FROM idempotency_keys")] == ["kept"]


def test_the_outbox_relay_sends_a_step_to_its_versions_queue_named_for_flower(
    flask_app, tasks, redis_url
):
    # Given a step whose fast-path publish never happened, for a task on version 2
    task_id = tasks.submit("echo", {"message": "late"})
    lose_step_messages(redis_url)
    tasks.scalar("UPDATE tasks SET agent_version = '2' WHERE id = :id RETURNING 1", id=task_id)
    tasks.scalar(
        "INSERT INTO outbox (task_name, queue, args, task_id, created_at) VALUES "
        "('outlast.run_step', 'steps', CAST(:args AS jsonb), :id, now() - interval '1 minute') "
        "RETURNING 1",
        args=f'["{task_id}", 0]',
        id=task_id,
    )

    # When the relay runs
    assert outbox.relay_due() == 1

    # Then the message is in version 2's queue, named with the agent and version
    client = redis_lib.Redis.from_url(redis_url)
    raw = client.lrange(messages.step_queue("echo", "2"), 0, -1)
    client.close()
    assert len(raw) == 1
    headers = json.loads(raw[0])["headers"]
    assert headers["shadow"] == "outlast.run_step[echo@2]"
    assert headers["argsrepr"] == f"task {task_id} step 0"
