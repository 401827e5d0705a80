"""The Celery app, configured from :mod:`app.settings` (Flask's Celery pattern).

:func:`create_app` is the Flask app factory with its Celery app attached
(``celery_init_app``); it lives here, above ``app``, so that ``app`` never imports the
Celery wiring (``app`` publishes through ``celery.current_app``). Tasks are declared with
``@shared_task`` in the ``tasks`` package and receive ids, never ORM objects.
"""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery, Task
from celery.app.amqp import AMQP
from celery.bootsteps import CLOSE, TERMINATE
from celery.signals import worker_init, worker_shutdown
from flask import Flask

from app import api
from app.engine import registry
from app.settings import Settings, SettingsError
from app.store import fleet, messages
from workers.beat import beat_schedule
from workers.redis_transport import TRANSPORT as REDIS_TRANSPORT

TASK_MODULES = ("tasks.steps", "tasks.webhooks", "tasks.sweeps")

# Redis redelivers an unacknowledged message after this long (kombu's restore). It must
# exceed the longest step (the hard time limit); the Postgres lease and the reaper are
# the fast recovery path, this is the slow safety net.
VISIBILITY_TIMEOUT = 2 * 3600
assert VISIBILITY_TIMEOUT > messages.STEP_TIME_LIMIT


def celery_config(settings: Settings) -> dict[str, Any]:
    """The whole Celery configuration for ``settings``."""
    redis_url = settings.require_redis_url()
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "socket_connect_timeout": 3,
        "socket_timeout": 30,
        "retry_on_timeout": True,
    }
    config: dict[str, Any] = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_ignore_result": True,
        "result_expires": 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "include": list(TASK_MODULES),
        "task_default_queue": messages.STEPS_QUEUE,
        "task_routes": messages.ROUTES,
        # A step's message is acknowledged only after it ran, and re-queued when the
        # pool child running it dies; fencing in PostgreSQL makes the redelivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A broker blip must not cost a step its attempt (V2.md 8): a running step goes on
        # (it needs only PostgreSQL) and commits; its next message goes through the outbox.
        # Cancelling it would leave its lease to expire and the reaper to add 1 to attempt.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        # Publishing must not hang a request when the broker is down: the outbox keeps
        # the message and the relay sends it when the broker is back.
        "task_publish_retry_policy": {
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        # Flower shows steps as they are sent and run.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # Heroku sends SIGTERM, then SIGKILL 30 s later: finish or re-queue before that.
        "worker_soft_shutdown_timeout": 20,
        "beat_schedule": beat_schedule(settings),
    }
    if redis_url.startswith(("redis://", "rediss://")):
        config["broker_transport"] = REDIS_TRANSPORT  # kombu 5.7's exit on Redis loss, fixed
    if redis_url.startswith("rediss://"):
        config["broker_use_ssl"] = {"ssl_cert_reqs": redis_ssl_cert_reqs(redis_url)}
        config["redis_backend_use_ssl"] = {"ssl_cert_reqs": redis_ssl_cert_reqs(redis_url)}
    return config


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_ssl_cert_reqs(redis_url: str) -> ssl.VerifyMode:
    """Certificate checking for a ``rediss://`` URL: verified unless the URL says
    ``?ssl_cert_reqs=none`` (Heroku Redis serves a self-signed certificate), as the
    redis client itself reads that parameter (celery#5371)."""
    raw = parse_qs(urlsplit(redis_url).query).get("ssl_cert_reqs", ["required"])[0]
    key = raw.lower().removeprefix("cert_")
    if key not in _CERT_REQS:
        raise SettingsError(
            f"REDIS_URL's ssl_cert_reqs must be required, optional or none, not {raw!r}"
        )
    return _CERT_REQS[key]


class ShadowNamedAMQP(AMQP):
    """Celery's message builder, with the ``task-sent`` event carrying the shadow name.

    Celery names a sent event after the real task (``outlast.run_step``) even when the
    message has a shadow name (``outlast.run_step[echo@1]``); its event state lets a
    ``task-sent`` that arrives after ``task-received`` overwrite the name, so Flower
    showed some steps without their agent (a step sent by a pool child, whose events
    are flushed later). The sent event now names what the worker's events name.
    """

    def as_task_v2(self, *args, **kwargs):
        message = super().as_task_v2(*args, **kwargs)
        shadow = message.headers.get("shadow")
        if shadow and message.sent_event is not None:
            message.sent_event["name"] = shadow
        return message


def celery_init_app(flask_app: Flask, settings: Settings) -> Celery:
    """Create the Celery app for ``flask_app`` and make it the default app."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(flask_app.name, task_cls=FlaskTask, amqp=ShadowNamedAMQP)
    celery_app.config_from_object(celery_config(settings))
    celery_app.set_default()
    flask_app.extensions["celery"] = celery_app
    return celery_app


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask app with its Celery app attached: what web and worker processes run."""
    flask_app = api.create_app(settings)
    celery_init_app(flask_app, flask_app.config["OUTLAST_SETTINGS"])
    return flask_app


# --- steps routed by agent version (V2.md 7; ARCHITECTURE.md, "Routing by version") -------

_heartbeats: dict[int, fleet.Heartbeat] = {}


@worker_init.connect
def _take_the_versions_this_worker_has(sender: Any, **_: object) -> None:
    """A worker that runs steps consumes the queue of every agent version its registry
    can run or migrate from, and advertises them (a heartbeat row) while it runs."""
    queues = sender.app.amqp.queues
    consuming = queues.consume_from
    if consuming is not None and messages.STEPS_QUEUE not in consuming:
        return  # a worker for webhooks or sweeps only takes no steps
    handles = registry.handled()
    for agent, version in handles:
        queues.select_add(messages.step_queue(agent, version))
    worker_id = f"{sender.hostname}/{os.getpid()}/{id(sender):x}"

    def running() -> bool:
        # An embedded worker (tests) may stop without sending worker_shutdown.
        blueprint = getattr(sender, "blueprint", None)
        return blueprint is None or blueprint.state not in (CLOSE, TERMINATE)

    _heartbeats[id(sender)] = fleet.Heartbeat(worker_id, handles, running).start()


@worker_shutdown.connect
def _stop_advertising(sender: Any = None, **_: object) -> None:
    heartbeat = _heartbeats.pop(id(sender), None)
    if heartbeat is not None:
        heartbeat.stop()
