"""Webhook deliveries (DESIGN.md, mechanism 6): an outbox of signed POSTs.

A ``webhook_deliveries`` row is written with the event it carries
(:func:`app.store.lifecycle.append_event`, or :func:`replay`), and a ``deliver_webhook``
message is queued through the outbox. One attempt (:func:`attempt_delivery`) is:

1. **claim** the row if it is due: ``SELECT … FOR UPDATE SKIP LOCKED``, then push
   ``next_attempt_at`` forward by the send lease and count the attempt. Two workers (or a
   duplicate message) never send the same attempt; a sender that dies mid-send leaves a
   row that becomes due again when its lease ends.
2. **send** the stored event JSON, signed per Standard Webhooks, to the URL (SSRF guard
   again, no redirects, a total timeout);
3. **record** the outcome, fenced on the attempt number: ``delivered``, ``failed``
   (``410``, or the last allowed attempt) or a retry at ``now + backoff``.

The beat's sweep (:func:`dispatch_due`) queues a message for each due row that has
none queued, so retries and lost messages survive restarts of every process.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import requests
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app import settings as settings_mod
from app.ops import metrics
from app.ops.redaction import redact_text
from app.settings import Settings
from app.store import db, outbox
from app.store.representation import event_json
from app.webhooks import urlguard
from app.webhooks.secrets import active_secrets
from outlast import webhooks as signing
from outlast.backoff import Backoff

log = logging.getLogger(__name__)

# The n-th retry waits between half and all of base * 2^(n-1), never more than this.
RETRY_CAP_SECONDS = 3600.0
# A receiver's Retry-After is honoured up to this (a garbage value must not park a
# delivery for years).
RETRY_AFTER_CAP_SECONDS = 86400.0
# last_error and attempt errors are kept short.
ERROR_MAX_CHARS = 500
USER_AGENT = "Outlast-Webhooks/1"
# One answer for a refused connection and for an address the SSRF guard refused: a
# tenant must not tell the two apart (V2.md 12a), or it could map the operator's network.
CONNECTION_REFUSED = "connection refused or not allowed"


class DeliveryStatus:
    """Mirrors the SQL enum ``delivery_status``."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


# --- timing ------------------------------------------------------------------------------


def retry_delay(retry_number: int, base_seconds: float, rng: random.Random | None = None) -> float:
    """Seconds before the ``retry_number``-th retry (1 after the first failed attempt):
    uniformly random between half and all of ``base × 2^(n-1)``, capped at one hour."""
    return Backoff(base=base_seconds, cap=RETRY_CAP_SECONDS, jitter=True).delay(retry_number, rng)


_DELAY_SECONDS = re.compile(r"[0-9]{1,12}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds from now, or ``None``
    for anything else. Never raises: the header is the receiver's text (``²`` passes
    ``str.isdigit``; a date in year 99999999999 overflows ``datetime``)."""
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except Exception:  # TypeError, ValueError, OverflowError, IndexError ...
        return None


def send_lease_seconds(settings: Settings) -> float:
    """How long a claimed delivery stays with its sender before it is due again: well
    past the longest attempt (:func:`send` ends every attempt after
    ``webhook_timeout_seconds`` of wall-clock time, plus the recording), so only a sender
    that died loses it."""
    return 2 * settings.webhook_timeout_seconds + 5


# A delivery that finds its tenant at OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT sends in
# flight waits this long (at most one sweep interval) before it is tried again.
def busy_wait_seconds(settings: Settings) -> float:
    return min(1.0, settings.webhook_sweep_seconds)


def requeue_after_seconds(settings: Settings) -> float:
    """How long a queued deliver message may go unconsumed before the sweep assumes it
    lost (a flushed broker) and queues another; a duplicate is harmless."""
    return max(10 * settings.webhook_sweep_seconds, 2 * settings.webhook_timeout_seconds)


# --- one HTTP attempt ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one attempt ended with."""

    delivered: bool
    status_code: int | None = None
    error: str | None = None
    gone: bool = False  # 410: the receiver asks us to stop
    retry_after: float | None = None  # seconds, from a 429/503 answer
    duration_ms: int = 0


def event_body(event_row: Mapping[str, Any]) -> bytes:
    """The POST body: the stored event as API.md's event object, serialised the same way
    on every attempt (the signature covers these exact bytes)."""
    return json.dumps(event_json(event_row), separators=(",", ":"), ensure_ascii=False).encode()


def _short(text: str) -> str:
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def send(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_seconds: float,
    allow_private: bool,
) -> Outcome:
    """POST ``body`` to ``url`` once and classify the answer; never raises for network
    or receiver errors. A ``2xx`` within ``timeout_seconds`` in total is delivered; a
    redirect is not followed (a failure); the SSRF guard runs on the URL and again on
    the connected address unless ``allow_private``.

    ``timeout_seconds`` is a wall-clock deadline for the whole attempt (DNS, connect,
    send, the status line and headers): the exchange runs in a thread of its own, and
    at the deadline its sockets are shut down, which ends any blocked read at once. A
    receiver that trickles a byte a second is cut off like one that never answers.
    (A DNS lookup cannot be interrupted; the attempt ends anyway and the thread ends
    when the resolver gives up.)
    """
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    exchange = _Exchange(url, body, headers, timeout_seconds, allow_private, started)
    thread = threading.Thread(target=exchange.run, name="webhook-send", daemon=True)
    thread.start()
    if not exchange.done.wait(timeout_seconds):
        exchange.abort()
        exchange.done.wait(1.0)  # let the thread unwind from the shut-down socket
        return Outcome(
            False, error=f"no answer within {timeout_seconds:g}s (timeout)", duration_ms=took()
        )
    assert exchange.outcome is not None
    return exchange.outcome


class _Exchange:
    """One HTTP exchange for :func:`send`, run in its own thread so that the attempt's
    deadline can end it: every socket it opens is registered, :meth:`abort` shuts them
    down."""

    def __init__(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_seconds: float,
        allow_private: bool,
        started: float,
    ):
        self.url = url
        self.body = body
        self.headers = headers
        self.timeout_seconds = timeout_seconds
        self.allow_private = allow_private
        self.started = started
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._aborted = False

    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            aborted = self._aborted
        if aborted:
            _shut(sock)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def run(self) -> None:
        try:
            self.outcome = self._exchange()
        except BaseException as exc:  # never let a customer URL crash the sender
            self.outcome = Outcome(
                False,
                error=_short(f"request failed: {redact_text(repr(exc))}"),
                duration_ms=self._took(),
            )
        finally:
            self.done.set()

    def _took(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def _remaining(self) -> float:
        return max(0.001, self.timeout_seconds - (time.monotonic() - self.started))

    def _exchange(self) -> Outcome:
        url, timeout_seconds, took = self.url, self.timeout_seconds, self._took
        try:
            urlguard.check_url(url, allow_private=self.allow_private)
        except urlguard.UnsafeUrl:
            return Outcome(False, error=CONNECTION_REFUSED, duration_ms=took())
        request_headers = {
            **self.headers,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        session = urlguard.guarded_session(allow_private=self.allow_private)
        _track_sockets(session, self._register)
        try:
            remaining = self._remaining()
            # stream=True: we stop after the status line and headers; the body is not needed.
            with session.post(
                url,
                data=self.body,
                headers=request_headers,
                timeout=(remaining, remaining),
                allow_redirects=False,
                stream=True,
            ) as response:
                code = response.status_code
                retry_after_header = response.headers.get("Retry-After")
        except urlguard.UnsafeUrl:
            return Outcome(False, error=CONNECTION_REFUSED, duration_ms=took())
        except requests.Timeout:
            return Outcome(
                False, error=f"no answer within {timeout_seconds:g}s (timeout)", duration_ms=took()
            )
        except requests.RequestException as exc:
            if self._aborted:
                return Outcome(
                    False,
                    error=f"no answer within {timeout_seconds:g}s (timeout)",
                    duration_ms=took(),
                )
            if isinstance(exc, requests.exceptions.SSLError):  # only after an allowed connect
                error = f"TLS failed: {redact_text(str(exc))}"
            elif isinstance(exc, requests.ConnectionError):
                error = CONNECTION_REFUSED
            else:
                error = f"request failed: {redact_text(str(exc))}"
            return Outcome(False, error=_short(error), duration_ms=took())
        except Exception as exc:  # a customer URL must never crash the sender: record, retry
            log.exception("unexpected error sending a webhook to %s", url)
            return Outcome(
                False, error=_short(f"request failed: {redact_text(repr(exc))}"), duration_ms=took()
            )
        finally:
            session.close()
        duration_ms = took()
        if duration_ms > timeout_seconds * 1000:
            return Outcome(
                False,
                status_code=code,
                error=f"answered {code} after the {timeout_seconds:g}s timeout",
                duration_ms=duration_ms,
            )
        if 200 <= code < 300:
            return Outcome(True, status_code=code, duration_ms=duration_ms)
        if code == 410:
            return Outcome(
                False,
                status_code=code,
                gone=True,
                error="410 Gone: the receiver asked for no more deliveries",
                duration_ms=duration_ms,
            )
        if 300 <= code < 400:
            error = f"redirect ({code}) not followed"
        else:
            error = f"HTTP {code}"
        retry_after = parse_retry_after(retry_after_header) if code in (429, 503) else None
        return Outcome(
            False, status_code=code, error=error, retry_after=retry_after, duration_ms=duration_ms
        )


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _track_sockets(session: requests.Session, register: Any) -> None:
    """Make every connection ``session`` opens hand its socket to ``register`` (the
    urllib3 connection classes of each adapter, the SSRF-guarded ones included, gain a
    ``_new_conn`` that registers)."""
    for adapter in set(session.adapters.values()):
        manager = getattr(adapter, "poolmanager", None)
        if manager is None:
            continue
        tracked = {}
        for scheme, pool_cls in manager.pool_classes_by_scheme.items():
            base_conn = pool_cls.ConnectionCls

            def _new_conn(self, _base=base_conn):  # type: ignore[no-untyped-def]
                sock = _base._new_conn(self)
                register(sock)
                return sock

            conn_cls = type(f"Tracked{base_conn.__name__}", (base_conn,), {"_new_conn": _new_conn})
            tracked[scheme] = type(
                f"Tracked{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": conn_cls}
            )
        manager.pool_classes_by_scheme = tracked


# --- claim, send, record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A delivery taken for one attempt: what to send and the fence for recording it."""

    delivery_id: str
    attempt: int
    url: str
    event_id: str
    body: bytes
    secrets: list[str]


def _abandon_previous_attempt(conn: Connection, delivery_id: str, attempt: int) -> None:
    # An attempt row with no outcome means its sender died mid-send.
    conn.execute(
        sa.text(
            "UPDATE webhook_attempts SET error = 'no outcome recorded: the sender was lost' "
            "WHERE delivery_id = :id AND attempt = :n AND status_code IS NULL AND error IS NULL"
        ),
        {"id": delivery_id, "n": attempt},
    )


def _tenant_has_capacity(conn: Connection, tenant_id: str, settings: Settings) -> bool:
    """Whether the tenant has fewer than ``webhook_concurrency_per_tenant`` sends in
    flight (a claimed attempt with no outcome yet, its send lease running). A
    transaction-scoped advisory lock per tenant makes the count and the claim that
    follows one step for concurrent claimers of the same tenant."""
    conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtextextended('outlast.webhooks:' || :t, 0))"),
        {"t": tenant_id},
    )
    in_flight = conn.execute(
        sa.text(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhook_attempts a "
            "ON a.delivery_id = d.id AND a.attempt = d.attempts "
            "WHERE d.tenant_id = :t AND d.status = 'pending' AND d.next_attempt_at > now() "
            "AND a.status_code IS NULL AND a.error IS NULL"
        ),
        {"t": tenant_id},
    ).scalar_one()
    return in_flight < settings.webhook_concurrency_per_tenant


def claim(delivery_id: str, settings: Settings) -> Claim | None:
    """Take a due, pending delivery for one attempt; ``None`` when it is not due, already
    being sent, finished, or out of attempts (then it is marked ``failed``)."""
    with db.transaction() as conn:
        row = (
            conn.execute(
                sa.text(
                    "SELECT id, tenant_id, task_id, event_seq, url, attempts "
                    "FROM webhook_deliveries WHERE id = :id AND status = 'pending' "
                    "AND next_attempt_at <= now() FOR UPDATE SKIP LOCKED"
                ),
                {"id": delivery_id},
            )
            .mappings()
            .one_or_none()
        )
        if row is None:
            return None
        if not _tenant_has_capacity(conn, row["tenant_id"], settings):
            # OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT sends of this tenant are in flight:
            # no attempt is counted; the sweep queues this one again shortly.
            conn.execute(
                sa.text(
                    "UPDATE webhook_deliveries SET enqueued_at = NULL, "
                    "next_attempt_at = now() + make_interval(secs => :wait) WHERE id = :id"
                ),
                {"id": delivery_id, "wait": busy_wait_seconds(settings)},
            )
            return None
        if row["attempts"] > 0:
            _abandon_previous_attempt(conn, delivery_id, row["attempts"])
        if row["attempts"] >= settings.webhook_max_attempts:
            # The last allowed attempt's sender died: nothing is left to try.
            conn.execute(
                sa.text(
                    "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, "
                    "enqueued_at = NULL, updated_at = now(), "
                    "last_error = COALESCE(last_error, 'no outcome recorded: the sender was lost') "
                    "WHERE id = :id"
                ),
                {"id": delivery_id},
            )
            return None
        attempt = row["attempts"] + 1
        conn.execute(
            sa.text(
                "UPDATE webhook_deliveries SET attempts = :n, enqueued_at = NULL, "
                "next_attempt_at = now() + make_interval(secs => :lease), updated_at = now() "
                "WHERE id = :id"
            ),
            {"id": delivery_id, "n": attempt, "lease": send_lease_seconds(settings)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO webhook_attempts (delivery_id, attempt) VALUES (:id, :n) "
                "ON CONFLICT (delivery_id, attempt) DO NOTHING"
            ),
            {"id": delivery_id, "n": attempt},
        )
        event = (
            conn.execute(
                sa.text(
                    "SELECT task_id, seq, id, type, data, created_at FROM events "
                    "WHERE task_id = :task_id AND seq = :seq"
                ),
                {"task_id": row["task_id"], "seq": row["event_seq"]},
            )
            .mappings()
            .one()
        )
        secrets = active_secrets(conn, row["tenant_id"])
    return Claim(delivery_id, attempt, row["url"], event["id"], event_body(event), secrets)


def record(claim_: Claim, outcome: Outcome, settings: Settings) -> str:
    """Store the attempt's outcome and the delivery's next state; returns that state
    (``delivered``, ``failed``, ``pending`` for a retry, or ``superseded`` when another
    sender took the row after this one's lease ended)."""
    if outcome.delivered:
        status, delay = DeliveryStatus.DELIVERED, None
    elif outcome.gone or claim_.attempt >= settings.webhook_max_attempts:
        status, delay = DeliveryStatus.FAILED, None
    else:
        status = DeliveryStatus.PENDING
        delay = retry_delay(claim_.attempt, settings.webhook_retry_base_seconds)
        if outcome.retry_after is not None and outcome.retry_after > delay:
            delay = min(outcome.retry_after, RETRY_AFTER_CAP_SECONDS)
    with db.transaction() as conn:
        conn.execute(
            sa.text(
                "UPDATE webhook_attempts SET status_code = :code, error = :error, "
                "duration_ms = :ms, retry_at = CASE WHEN CAST(:delay AS double precision) "
                "IS NULL THEN NULL ELSE now() + make_interval(secs => CAST(:delay AS double "
                "precision)) END WHERE delivery_id = :id AND attempt = :n"
            ),
            {
                "id": claim_.delivery_id,
                "n": claim_.attempt,
                "code": outcome.status_code,
                "error": outcome.error,
                "ms": outcome.duration_ms,
                "delay": delay,
            },
        )
        # Fenced on the attempt number: a sender whose lease ran out records its attempt
        # above but no longer decides the delivery's state.
        updated = conn.execute(
            sa.text(
                "UPDATE webhook_deliveries SET status = CAST(:status AS delivery_status), "
                "last_status_code = :code, last_error = :error, updated_at = now(), "
                "next_attempt_at = CASE WHEN CAST(:delay AS double precision) IS NULL THEN NULL "
                "ELSE now() + make_interval(secs => CAST(:delay AS double precision)) END, "
                "delivered_at = CASE WHEN :delivered THEN now() ELSE NULL END "
                "WHERE id = :id AND attempts = :n AND status = 'pending'"
            ),
            {
                "id": claim_.delivery_id,
                "n": claim_.attempt,
                "status": status,
                "code": outcome.status_code,
                "error": outcome.error,
                "delay": delay,
                "delivered": outcome.delivered,
            },
        )
    metrics.webhook_attempt("retrying" if status == DeliveryStatus.PENDING else status)
    return status if updated.rowcount == 1 else "superseded"


def attempt_delivery(delivery_id: str, settings: Settings | None = None) -> str:
    """One attempt of one delivery, if it is due (the ``deliver_webhook`` task).

    Returns what happened: ``delivered``, ``pending`` (a retry is scheduled), ``failed``,
    ``superseded``, or ``skipped`` (not due, being sent elsewhere, or finished).
    """
    settings = settings or settings_mod.current()
    claimed = claim(delivery_id, settings)
    if claimed is None:
        return "skipped"
    if not claimed.secrets:
        # Unsigned webhooks would be unverifiable: treat as a failed attempt.
        outcome = Outcome(False, error="the tenant has no webhook signing secret")
    else:
        headers = signing.signature_headers(claimed.secrets, claimed.event_id, claimed.body)
        outcome = send(
            claimed.url,
            claimed.body,
            headers,
            timeout_seconds=settings.webhook_timeout_seconds,
            allow_private=settings.webhook_allow_private,
        )
    result = record(claimed, outcome, settings)
    log.info(
        "webhook attempt",
        extra={
            "delivery_id": delivery_id,
            "attempt": claimed.attempt,
            "status_code": outcome.status_code,
            "error": outcome.error,
            "result": result,
        },
    )
    return result


def dispatch_due(settings: Settings | None = None, limit: int = 500) -> int:
    """The beat's sweep: queue a deliver message for every due pending delivery that has
    none queued (or whose message has waited suspiciously long). Returns how many."""
    settings = settings or settings_mod.current()
    with db.transaction() as conn:
        due = list(
            conn.execute(
                sa.text(
                    "WITH due AS ("
                    " SELECT id FROM webhook_deliveries"
                    " WHERE status = 'pending' AND next_attempt_at <= now()"
                    " AND (enqueued_at IS NULL"
                    "      OR enqueued_at < now() - make_interval(secs => :requeue))"
                    " ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED) "
                    "UPDATE webhook_deliveries d SET enqueued_at = now() FROM due "
                    "WHERE d.id = due.id RETURNING d.id"
                ),
                {"requeue": requeue_after_seconds(settings), "limit": limit},
            ).scalars()
        )
        for delivery_id in due:
            outbox.add_delivery(conn, delivery_id)
    return len(due)
