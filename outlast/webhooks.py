"""Standard Webhooks signatures: signing our deliveries, and verifying them for receivers.

A delivery carries three headers (https://www.standardwebhooks.com):

- ``webhook-id``: the event id, the same on every retry and replay (receivers
  deduplicate on it);
- ``webhook-timestamp``: unix seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed
  by the base64-decoded part of a ``whsec_`` secret; several signatures, separated by
  spaces, while a rotated-out secret is still valid.

This module has no dependency beyond the standard library so that receivers (and the
Python client, which re-exports :func:`verify_webhook`) can import it on its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
# Receivers refuse a timestamp further than this from their clock (replay protection).
DEFAULT_TOLERANCE_SECONDS = 300

__all__ = [
    "WebhookVerificationError",
    "secret_key",
    "sign",
    "signature_headers",
    "verify_webhook",
]


class WebhookVerificationError(ValueError):
    """The webhook is not authentic or not fresh; the message says which check failed."""


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (raw bytes are taken as the key)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            # Tolerate unpadded base64, as the reference implementation does.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a webhook secret must not be empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def _body_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def sign(secrets: Iterable[str | bytes], msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space-separated."""
    payload = _body_bytes(body)
    signatures = [
        f"{SIGNATURE_VERSION},"
        + base64.b64encode(_signature(secret_key(s), msg_id, timestamp, payload)).decode()
        for s in secrets
    ]
    if not signatures:
        raise ValueError("at least one secret is needed to sign a webhook")
    return " ".join(signatures)


def signature_headers(
    secrets: Iterable[str | bytes],
    msg_id: str,
    body: bytes | str,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt (``timestamp`` default: now)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secrets, msg_id, ts, body),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Mappings from web frameworks are case-insensitive already; a plain dict may not be.
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def verify_webhook(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check an Outlast webhook and return its parsed JSON body (the event).

    ``secret`` is the tenant's ``whsec_…`` secret, ``headers`` the request headers (any
    mapping; names are matched case-insensitively), ``body`` the raw request body exactly
    as received. Raises :class:`WebhookVerificationError` when a header is missing, the
    timestamp is more than ``tolerance_seconds`` (5 minutes) away from ``now``, or no
    ``v1`` signature matches. Signatures are compared in constant time.
    """
    msg_id = _header(headers, "webhook-id")
    timestamp_text = _header(headers, "webhook-timestamp")
    signature_header = _header(headers, "webhook-signature")
    if not (msg_id and timestamp_text and signature_header):
        raise WebhookVerificationError(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(timestamp_text.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not unix seconds") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance_seconds:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance_seconds:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    payload = _body_bytes(body)
    expected = _signature(secret_key(secret), msg_id, timestamp, payload)
    matched = False
    for candidate in signature_header.split():
        version, _, encoded = candidate.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # No early exit: the time taken does not depend on which signature matched.
        matched |= hmac.compare_digest(expected, given)
    if not matched:
        raise WebhookVerificationError("no webhook-signature matches the secret")
    try:
        return json.loads(payload)
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None
