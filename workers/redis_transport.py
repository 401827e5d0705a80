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

The same path is reached by acknowledging (or rejecting) a message after its channel
was closed that way: a thread-pool task (a webhook send, a sweep) that ends after the
connection was lost acks through a channel whose ``connection`` is ``None``, and
``_connparams`` raises ``AttributeError: 'NoneType' object has no attribute 'client'``,
which ended the side pool in the chaos run (bench/chaos.py). Such an ack is skipped the
same way: the message stays in ``unacked`` and a redelivery finds its work done (the
delivery row, the lease and every sweep are idempotent).
"""

from __future__ import annotations

from kombu.transport import redis

TRANSPORT = "workers.redis_transport:Transport"


def _lost(channel: redis.Channel) -> bool:
    """The channel's connection (or its transport's client) is gone."""
    return getattr(channel.connection, "client", None) is None


class QoS(redis.QoS):
    def restore_unacked_once(self, stderr: object = None) -> None:
        if _lost(self.channel):
            self._on_collect.cancel()
            return None  # the connection is gone: Redis keeps them in "unacked"
        return super().restore_unacked_once(stderr)

    def ack(self, delivery_tag: str) -> None:
        if _lost(self.channel):
            return None  # the connection is gone: the message stays in "unacked"
        return super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if _lost(self.channel):
            return None  # likewise: Redis restores it after the visibility timeout
        return super().reject(delivery_tag, requeue=requeue)


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
