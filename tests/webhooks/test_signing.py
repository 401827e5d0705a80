"""Standard Webhooks signing and the receivers' verify_webhook, checked against the
``standardwebhooks`` reference package in both directions."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks import WebhookVerificationError as RefVerificationError

from app.store import tenants
from outlast import webhooks as signing
from outlast.webhooks import WebhookVerificationError, verify_webhook

BODY = json.dumps({"id": "evt_1", "type": "task.completed", "data": {"n": 1}}).encode()


@pytest.fixture
def secret() -> str:
    return tenants.new_webhook_secret()


def test_our_signature_is_accepted_by_the_reference_package(secret):
    headers = signing.signature_headers([secret], "evt_1", BODY)
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_our_signature_equals_the_reference_signature(secret):
    ts = int(time.time())
    expected = Webhook(secret).sign("evt_1", datetime.fromtimestamp(ts, UTC), BODY.decode())
    assert signing.sign([secret], "evt_1", ts, BODY) == expected


def test_signature_is_hmac_sha256_of_id_timestamp_body_keyed_by_decoded_secret():
    import hashlib
    import hmac

    key = bytes(range(32))
    secret = "whsec_" + base64.b64encode(key).decode()
    digest = hmac.new(key, b"evt_9.1700000000." + BODY, hashlib.sha256).digest()
    assert signing.sign([secret], "evt_9", 1700000000, BODY) == (
        "v1," + base64.b64encode(digest).decode()
    )


def test_two_secrets_give_two_space_separated_signatures_each_verifiable(secret):
    old = tenants.new_webhook_secret()
    headers = signing.signature_headers([secret, old], "evt_1", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(s.startswith("v1,") for s in headers["webhook-signature"].split(" "))
    Webhook(secret).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)
    assert verify_webhook(secret, headers, BODY)["id"] == "evt_1"
    assert verify_webhook(old, headers, BODY)["id"] == "evt_1"


def test_verify_webhook_accepts_a_reference_signed_request(secret):
    ts = int(time.time())
    signature = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, UTC), BODY.decode())
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(ts), "Webhook-Signature": signature}
    assert verify_webhook(secret, headers, BODY) == json.loads(BODY)
    assert verify_webhook(secret, headers, BODY.decode()) == json.loads(BODY)


def test_verify_webhook_refuses_a_changed_body(secret):
    headers = signing.signature_headers([secret], "evt_1", BODY)
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_webhook(secret, headers, BODY + b" ")


def test_verify_webhook_refuses_another_secret(secret):
    headers = signing.signature_headers([secret], "evt_1", BODY)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(tenants.new_webhook_secret(), headers, BODY)


def test_verify_webhook_refuses_a_changed_id(secret):
    headers = signing.signature_headers([secret], "evt_1", BODY)
    headers["webhook-id"] = "evt_2"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, BODY)


@pytest.mark.parametrize("offset", [-301, 301])
def test_verify_webhook_refuses_timestamps_more_than_five_minutes_away(secret, offset):
    ts = int(time.time()) + offset
    headers = signing.signature_headers([secret], "evt_1", BODY, timestamp=ts)
    with pytest.raises(WebhookVerificationError, match="timestamp"):
        verify_webhook(secret, headers, BODY)
    with pytest.raises(RefVerificationError):  # the reference package agrees
        Webhook(secret).verify(BODY, headers)


@pytest.mark.parametrize("offset", [-290, 290])
def test_verify_webhook_accepts_timestamps_within_five_minutes(secret, offset):
    ts = int(time.time()) + offset
    headers = signing.signature_headers([secret], "evt_1", BODY, timestamp=ts)
    assert verify_webhook(secret, headers, BODY)["id"] == "evt_1"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_webhook_refuses_a_missing_header(secret, missing):
    headers = signing.signature_headers([secret], "evt_1", BODY)
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(secret, headers, BODY)


def test_verify_webhook_ignores_unknown_versions_and_garbage_signatures(secret):
    headers = signing.signature_headers([secret], "evt_1", BODY)
    good = headers["webhook-signature"]
    headers["webhook-signature"] = f"v2,abc v1,!!notbase64 {good}"
    assert verify_webhook(secret, headers, BODY)["id"] == "evt_1"
    headers["webhook-signature"] = "v2," + good.split(",", 1)[1]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, BODY)


def test_verify_webhook_uses_constant_time_comparison(secret, monkeypatch):
    # The comparison must go through hmac.compare_digest (not ==), for every candidate.
    import hmac as hmac_mod

    calls = []
    real = hmac_mod.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    old = tenants.new_webhook_secret()
    headers = signing.signature_headers([old, secret], "evt_1", BODY)
    verify_webhook(secret, headers, BODY)
    assert len(calls) == 2


def test_malformed_secret_is_refused():
    with pytest.raises(ValueError):
        signing.secret_key("whsec_not base64!")
    with pytest.raises(ValueError):
        signing.secret_key("whsec_")
