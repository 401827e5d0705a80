"""kombu's Redis transport with one fix: a worker does not exit when Redis goes away.

The fault (celery 5.7.0, kombu 5.7.0; docs/reliability.md, "known issues"): on a broker
connection error the consumer collects and closes the connection, which sets the
transport's ``client`` to ``None``; the task consumer's channel is closed after that,
and closing a channel restores its unacknowledged messages, which needs a Redis client,
built from ``transport.client`` in ``Channel._connparams``: ``AttributeError: 'NoneType'
object has no attribute 'hostname'``. ``ignore_errors`` lets only connection and channel
errors through, so the AttributeError ends the worker ("Unrecoverable error"). It
happens only while the worker holds an unacknowledged message (a running ``acks_late``
step) at the moment Redis is lost, which is why it was seen in 3 of 18 outages. The same
failing path is kombu#582 (``'NoneType' object has no attribute 'hostname'`` in
``_connparams`` while closing a channel after the connection went away).

The fix: a channel whose transport has no client any more skips the restore. Nothing
is lost: the messages are still in Redis's ``unacked`` hash, which the transport
restores after the visibility timeout, and for a step the PostgreSQL lease decides who
runs it anyway (the running step goes on and commits; a redelivered duplicate is
skipped).
"""

from __future__ import annotations

from kombu.transport import redis

TRANSPORT = "workers.redis_transport:Transport"


class QoS(redis.QoS):
    def restore_unacked_once(self, stderr: object = None) -> None:
        if getattr(self.channel.connection, "client", None) is None:
            self._on_collect.cancel()
            return None  # the connection is gone: Redis keeps them in "unacked"
        return super().restore_unacked_once(stderr)


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
