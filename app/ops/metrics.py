"""Prometheus metrics that every process records and the web process exposes.

Web, worker and beat may run on different machines (Heroku dynos), so a process's own
memory cannot hold the numbers one scrape reads: prometheus-client's multiprocess mode
shares files on one machine only, and a Pushgateway is one more service to run. Every
Outlast process already talks to the same Redis (the Celery broker), so recorders add to
Redis hashes (``HINCRBY``/``HINCRBYFLOAT``, atomic; summed in the process and sent in one
pipeline within 50 ms by a background thread, off the hot path), and ``GET
/metrics`` reads them through a prometheus-client *custom collector*
(``CounterMetricFamily``/``HistogramMetricFamily``) together with what is measured at
scrape time: the queue depth per queue (``LLEN``), the broker's unacknowledged
messages, the outbox backlog and the tasks stranded on an agent version no live worker
can take (PostgreSQL). Counters live as long as Redis does;
losing Redis resets them, which Prometheus treats like a process restart.

Recording never raises: a metric that cannot be written is dropped with a log line, so
metrics can never fail a step, a delivery or a request.

Helpers for the rest of the code:

- :func:`step_finished` (the step runner), :func:`tool_call` (the tool-call log),
  :func:`webhook_attempt` (the webhook sender), :func:`lease_reaped` (the reaper),
  :func:`tasks_deleted` (``DELETE /v1/tasks/{id}`` and the retention purge);
- :func:`install` subscribes :func:`note_task_event` to ``app.store.lifecycle``'s events:
  it counts ``task.created`` (submitted) and terminal events (finished) once the
  transaction that wrote them commits, so a rolled-back transition is never counted.
"""

from __future__ import annotations

import atexit
import bisect
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from app.store import db, fleet, lifecycle, messages, outbox

log = logging.getLogger(__name__)

KEY_PREFIX = "outlast:metrics:"
# kombu's Redis transport keeps one list per priority level: "<queue>", "<queue>\x06\x163", …
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
_KOMBU_UNACKED = "unacked"

# Steps range from milliseconds (echo) to an hour (STEP_TIME_LIMIT).
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


# --- definitions ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Def:
    name: str  # without the _total suffix for counters
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name


TASKS_SUBMITTED = _Def(
    "outlast_tasks_submitted", "counter", "Tasks accepted by POST /v1/tasks.", ("agent",)
)
TASKS_FINISHED = _Def(
    "outlast_tasks_finished",
    "counter",
    "Tasks that reached a terminal status.",
    ("agent", "status"),
)
STEP_DURATION = _Def(
    "outlast_step_duration_seconds",
    "histogram",
    "Wall-clock time of one step execution, by how it ended.",
    ("agent", "outcome"),
    STEP_BUCKETS,
)
TOOL_CALLS = _Def(
    "outlast_tool_calls", "counter", "Tool and model calls by outcome.", ("tool", "outcome")
)
WEBHOOK_ATTEMPTS = _Def(
    "outlast_webhook_attempts", "counter", "Webhook delivery attempts by outcome.", ("outcome",)
)
LEASES_REAPED = _Def(
    "outlast_leases_reaped",
    "counter",
    "Expired step leases reclaimed by the reaper (retried, or failed with worker_lost).",
    ("outcome",),
)
TASKS_DELETED = _Def(
    "outlast_tasks_deleted",
    "counter",
    "Tasks deleted with everything recorded about them: by DELETE /v1/tasks/{id} "
    "(request) or by the retention purge (retention).",
    ("reason",),
)
DEFINITIONS = (
    TASKS_SUBMITTED,
    TASKS_FINISHED,
    STEP_DURATION,
    TOOL_CALLS,
    WEBHOOK_ATTEMPTS,
    LEASES_REAPED,
    TASKS_DELETED,
)


# --- the Redis store --------------------------------------------------------------------

_client_lock = threading.Lock()
_client: Any = None
_client_key: tuple[int, str] | None = None  # (pid, url): a forked child makes its own


def _redis() -> Any:
    """This process's Redis client for metrics (short timeouts: a metric never stalls)."""
    global _client, _client_key
    from app import settings

    url = settings.current().require_redis_url()
    key = (os.getpid(), url)
    if _client_key != key:
        with _client_lock:
            if _client_key != key:
                import redis

                _client = redis.Redis.from_url(
                    url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=30
                )
                _client_key = key
    return _client


def _redis_url() -> str | None:
    from app import settings

    return settings.current().redis_url


def _field(label_values: Sequence[str], part: str | None = None) -> str:
    values = [str(v) for v in label_values]
    return json.dumps(values if part is None else [*values, part], separators=(",", ":"))


def _check(definition: _Def, label_values: Sequence[str]) -> None:
    if len(label_values) != len(definition.labels):
        raise ValueError(f"{definition.name} takes labels {definition.labels}, got {label_values}")


# Recordings wait at most this long in the process before one pipeline sends them all.
FLUSH_SECONDS = 0.05


class _Pending:
    """Increments recorded by this process and not yet sent to Redis.

    A pipeline per recording put a Redis round trip on every step and every submission;
    here recordings are summed in memory and a background thread sends them all in one
    pipeline within :data:`FLUSH_SECONDS`. A scrape answered by this process sends them
    first, so what it recorded is in what it reads. At most that window is lost if the
    process is killed (at exit the rest is sent).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._sending = threading.Lock()  # one send at a time: see flush()
        self._sums: dict[tuple[str, str], int | float] = {}
        self._redis_url: str | None = None  # where they go
        self._thread: threading.Thread | None = None

    def add(self, key: str, field: str, amount: int | float) -> None:
        if self._pid != os.getpid():  # a forked child does not send its parent's counts
            self._reset()
        url = _redis_url()
        with self._cond:
            if url != self._redis_url:  # the settings name another Redis (tests do)
                self._sums, self._redis_url = {}, url
            self._sums[(key, field)] = self._sums.get((key, field), 0) + amount
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._sums:
                    self._cond.wait()
            time.sleep(FLUSH_SECONDS)  # let more recordings join this pipeline
            self.flush()

    def flush(self) -> None:
        """Send what is pending (never raises; a failed send is dropped with a log line,
        like a failed recording always was).

        Sends are serialised: when this returns, everything recorded before the call is
        in Redis, including sums the background thread had taken and not yet sent. A
        scrape relies on that to read its own recordings.
        """
        if self._pid != os.getpid():
            self._reset()
        with self._sending:
            self._send()

    def _send(self) -> None:
        url = _redis_url()
        with self._cond:
            sums, self._sums = self._sums, {}
        if not sums or url != self._redis_url:  # recorded for a Redis no longer ours
            return
        try:
            pipe = _redis().pipeline(transaction=False)
            for (key, field), amount in sums.items():
                if isinstance(amount, float):
                    pipe.hincrbyfloat(key, field, amount)
                else:
                    pipe.hincrby(key, field, amount)
            pipe.execute()
        except Exception as exc:  # metrics never break the work they measure
            log.warning("%d metric increments not recorded: %s", len(sums), exc)


_pending = _Pending()
atexit.register(_pending.flush)


def flush() -> None:
    """Send this process's pending recordings to Redis now."""
    _pending.flush()


def inc(definition: _Def, label_values: Sequence[str], amount: int = 1) -> None:
    """Add ``amount`` to the counter ``definition`` for ``label_values``."""
    _check(definition, label_values)
    _pending.add(definition.key, _field(label_values), int(amount))


def observe(definition: _Def, label_values: Sequence[str], value: float) -> None:
    """Record ``value`` in the histogram ``definition`` for ``label_values``."""
    _check(definition, label_values)
    index = bisect.bisect_left(definition.buckets, value)
    bucket = repr(float(definition.buckets[index])) if index < len(definition.buckets) else "+Inf"
    _pending.add(definition.key, _field(label_values, bucket), 1)
    _pending.add(definition.key, _field(label_values, "count"), 1)
    _pending.add(definition.key, _field(label_values, "sum"), float(value))


# --- helpers for the rest of the code -------------------------------------------------------


def step_finished(agent: str, outcome: str, seconds: float) -> None:
    """One step execution ended after ``seconds``.

    ``outcome`` is what :func:`app.engine.runner.run_step` returned: ``continued`` (checkpoint
    written, next step queued), ``completed``, ``input_required``, ``sleeping``,
    ``retrying`` (transient error), ``failed``, ``discarded`` (lease lost or cancelled).
    """
    observe(STEP_DURATION, (agent, outcome), max(0.0, seconds))


def tool_call(tool: str, outcome: str) -> None:
    """One tool or model call: ``outcome`` is ``completed``, ``failed`` or ``replayed``
    (its completion was in the log and its stored output was returned)."""
    inc(TOOL_CALLS, (tool, outcome))


def webhook_attempt(outcome: str) -> None:
    """One webhook POST: ``outcome`` is ``delivered`` (2xx), ``retrying`` (will be tried
    again) or ``failed`` (gave up: attempts exhausted or 410 Gone)."""
    inc(WEBHOOK_ATTEMPTS, (outcome,))


def lease_reaped(outcome: str) -> None:
    """The reaper reclaimed an expired lease: ``retried`` or ``failed`` (worker_lost)."""
    inc(LEASES_REAPED, (outcome,))


def tasks_deleted(reason: str, count: int = 1) -> None:
    """``count`` tasks were deleted (after the commit): ``reason`` is ``request`` (``DELETE
    /v1/tasks/{id}``) or ``retention`` (the purge)."""
    inc(TASKS_DELETED, (reason,), count)


def task_submitted(agent: str) -> None:
    """A task was accepted (counted by :func:`note_task_event`; call directly only for
    a submission that writes no ``task.created`` event)."""
    inc(TASKS_SUBMITTED, (agent,))


def task_finished(agent: str, status: str) -> None:
    """A task reached the terminal ``status`` (see :func:`note_task_event`)."""
    inc(TASKS_FINISHED, (agent, status))


# --- counting lifecycle events after their transaction commits ---------------------------


def note_task_event(event_type: lifecycle.EventType, task: Mapping[str, Any]) -> None:
    """Count submissions and terminal transitions (told of every committed event)."""
    if event_type == lifecycle.EventType.CREATED:
        task_submitted(task["agent"])
    elif event_type in lifecycle.TERMINAL_EVENTS:
        task_finished(task["agent"], lifecycle.TERMINAL_EVENTS[event_type].value)


def install() -> None:
    """Count the events of every transaction this process commits (idempotent)."""
    lifecycle.subscribe(note_task_event)


# --- the scrape ---------------------------------------------------------------------------


def _counter(definition: _Def, raw: Mapping[bytes, bytes]) -> Metric:
    family = CounterMetricFamily(definition.name, definition.help, labels=definition.labels)
    for field, value in sorted(raw.items()):
        family.add_metric(json.loads(field), float(value))
    return family


def _histogram(definition: _Def, raw: Mapping[bytes, bytes]) -> Metric:
    family = HistogramMetricFamily(definition.name, definition.help, labels=definition.labels)
    series: dict[tuple[str, ...], dict[str, float]] = {}
    for field, value in raw.items():
        *labels, part = json.loads(field)
        series.setdefault(tuple(labels), {})[part] = float(value)
    bounds = [repr(float(b)) for b in definition.buckets] + ["+Inf"]
    for labels, parts in sorted(series.items()):
        cumulative, buckets = 0.0, []
        for bound in bounds:
            cumulative += parts.get(bound, 0.0)
            buckets.append((bound, cumulative))
        family.add_metric(list(labels), buckets, parts.get("sum", 0.0))
    return family


class OutlastCollector:
    """Reads the recorded metrics from Redis and measures queues and the outbox."""

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "outlast_metrics_source_up",
            "1 when the scrape could read this source, else 0.",
            labels=("source",),
        )
        try:
            yield from self._from_redis()
            up.add_metric(["redis"], 1)
        except Exception as exc:
            log.warning("metrics scrape: Redis unavailable: %s", exc)
            up.add_metric(["redis"], 0)
        try:
            yield from self._from_database()
            up.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics scrape: database unavailable: %s", exc)
            up.add_metric(["database"], 0)
        yield up

    def _from_redis(self) -> Iterable[Metric]:
        flush()  # what this process recorded is in what it reads
        client = _redis()
        # Steps wait in one queue per agent version (messages.step_queue); the "steps"
        # depth is all of them together (their priority lists included).
        version_queues = sorted(client.scan_iter(match=messages.STEP_QUEUE_PREFIX + "*", count=500))
        pipe = client.pipeline(transaction=False)
        for definition in DEFINITIONS:
            pipe.hgetall(definition.key)
        for queue in messages.QUEUES:
            for priority in _KOMBU_PRIORITY_STEPS:
                pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{priority}" if priority else queue)
        pipe.hlen(_KOMBU_UNACKED)
        for key in version_queues:
            pipe.llen(key)
        results = pipe.execute()
        version_depth = sum(results[len(results) - len(version_queues) :]) if version_queues else 0
        results = results[: len(results) - len(version_queues)]
        metrics: list[Metric] = []
        for definition, raw in zip(DEFINITIONS, results, strict=False):
            build = _histogram if definition.kind == "histogram" else _counter
            metrics.append(build(definition, raw))
        depth = GaugeMetricFamily(
            "outlast_queue_depth",
            "Messages waiting in each Celery queue (Redis LLEN at scrape time).",
            labels=("queue",),
        )
        lengths = results[len(DEFINITIONS) :]
        per_queue = len(_KOMBU_PRIORITY_STEPS)
        for i, queue in enumerate(messages.QUEUES):
            waiting = sum(lengths[i * per_queue : (i + 1) * per_queue])
            if queue == messages.STEPS_QUEUE:
                waiting += version_depth
            depth.add_metric([queue], waiting)
        metrics.append(depth)
        metrics.append(
            GaugeMetricFamily(
                "outlast_broker_unacked_messages",
                "Messages delivered to a worker and not yet acknowledged (running steps).",
                value=lengths[-1],
            )
        )
        return metrics

    def _from_database(self) -> Iterable[Metric]:
        backlog = outbox.backlog()
        with db.engine().connect() as conn:
            in_flight = fleet.tasks_in_flight(conn)
            workers = fleet.live_workers(conn)
        lost = fleet.stranded(in_flight, workers)
        stranded = GaugeMetricFamily(
            "outlast_tasks_stranded",
            "Tasks in flight on an agent version that no live worker can run or migrate "
            "from (they wait, and run once such a worker starts).",
            labels=("agent", "version"),
        )
        for agent, version in sorted(in_flight):
            stranded.add_metric([agent, version], lost.get((agent, version), 0))
        return [
            stranded,
            GaugeMetricFamily(
                "outlast_outbox_backlog",
                "Outbox messages written but not yet published to the broker.",
                value=backlog.messages,
            ),
            GaugeMetricFamily(
                "outlast_outbox_oldest_age_seconds",
                "Age of the oldest unpublished outbox message (0 when empty).",
                value=backlog.oldest_age_seconds,
            ),
        ]


def registry() -> CollectorRegistry:
    """A registry holding only Outlast's shared metrics (no per-process collectors: the
    web process that answers a scrape is one of many)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(OutlastCollector())
    return reg
