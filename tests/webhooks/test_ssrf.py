"""The SSRF guard: at submission (POST /v1/tasks answers 422) and at send time (a
refused URL is a recorded failed attempt), unless OUTLAST_WEBHOOK_ALLOW_PRIVATE=1."""

from __future__ import annotations

import pytest

from app.webhooks.sender import CONNECTION_REFUSED, send
from app.webhooks.urlguard import HOST_NOT_ALLOWED, UnsafeUrl, check_url, guarded_session
from tests.engine import rebinding
from tests.harness import wait_until
from tests.webhooks.helpers import attempts, deliveries, finish_task

PRIVATE = "0"

REFUSED = [
    "http://127.0.0.1/hooks",
    "http://[::1]/hooks",
    "http://10.0.0.1/hooks",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:127.0.0.1]/hooks",
    "http://localhost:8080/hooks",  # a hostname that resolves to loopback
    "https://127.0.0.1:8443/hooks",
    "http://127.1/hooks",  # short IPv4 form, resolved by the system
    "http://0.0.0.0/",
    "http://192.168.1.10/",
    "http://172.16.5.4/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
    "http://[fe80::1]/",  # IPv6 link-local
    "http://[fc00::1]/",  # IPv6 unique local
    "http://[ff02::1]/",  # IPv6 multicast
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped 169.254.169.254 in hex
    "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
]


@pytest.mark.parametrize("url", REFUSED)
def test_guard_refuses_private_loopback_link_local_multicast_and_reserved_hosts(url):
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "gopher://x",
        "http://",
        "http://u:p@93.184.216.34/",
    ],
)
def test_guard_refuses_other_schemes_missing_hosts_and_credentials_even_when_private_is_allowed(
    url,
):
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_private=True)


def test_guard_accepts_a_public_address():
    assert check_url("https://93.184.216.34/hooks", allow_private=False)
    assert check_url("http://[2606:4700:4700::1111]/x", allow_private=False)


def test_guarded_session_refuses_a_connection_that_lands_on_loopback(make_receiver):
    # The send-time check of the connected address: whatever the name resolved to when
    # it was checked, the socket's peer is what counts (DNS rebinding).
    receiver = make_receiver()
    session = guarded_session(allow_private=False)
    for url in (receiver.url, f"http://localhost:{receiver.port}/hooks"):
        with pytest.raises(UnsafeUrl, match="connection was not allowed"):
            session.post(url, data=b"{}", timeout=3)
    session.close()
    assert receiver.count() == 0
    with guarded_session(allow_private=True) as allowed:
        assert allowed.post(receiver.url, data=b"{}", timeout=3).status_code == 200
    assert receiver.count() == 1


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_ALLOW_PRIVATE=PRIVATE, OUTLAST_WEBHOOK_MAX_ATTEMPTS="2")
def test_send_time_guard_records_a_refused_url_as_a_failed_attempt(
    tenant, celery_worker, beat, make_receiver
):
    # The tasks were stored without the submission check (as if DNS changed since).
    receiver = make_receiver()
    task_ids = [
        finish_task(tenant.tenant_id, f"http://{host}:{receiver.port}/hooks")
        for host in ("127.0.0.1", "localhost")
    ]

    for task_id in task_ids:
        rows = wait_until(
            lambda t=task_id: [r for r in deliveries(t) if r["status"] == "failed"],
            20,
            what="failed",
        )
        assert rows[0]["attempts"] == 2
        assert rows[0]["last_status_code"] is None
        # The same words as any refused connection: nothing tells "not allowed" apart.
        assert rows[0]["last_error"] == CONNECTION_REFUSED
        tried = attempts(rows[0]["id"])
        assert len(tried) == 2 and all(a["error"] == CONNECTION_REFUSED for a in tried)
    assert receiver.count() == 0


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_ALLOW_PRIVATE=PRIVATE)
def test_submission_with_a_refused_webhook_url_answers_422_naming_the_field(client, auth):
    for url in [
        "http://127.0.0.1/hooks",
        "http://[::1]/hooks",
        "http://10.0.0.1/hooks",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/hooks",
        "http://localhost/hooks",
        "ftp://example.com/hooks",
    ]:
        response = client.post(
            "/v1/tasks",
            json={"agent": "echo", "input": {"message": "hi"}, "webhook_url": url},
            headers=auth,
        )
        assert response.status_code == 422, (url, response.get_json())
        body = response.get_json()
        assert response.content_type == "application/problem+json"
        assert body["code"] == "validation_error"
        assert list(body["errors"]) == ["webhook_url"] and body["errors"]["webhook_url"], url


def test_submission_with_a_loopback_webhook_url_is_accepted_when_private_is_allowed(client, auth):
    response = client.post(
        "/v1/tasks",
        json={"agent": "echo", "input": {"message": "hi"}, "webhook_url": "http://127.0.0.1:9/x"},
        headers=auth,
    )
    assert response.status_code == 202, response.get_json()


# --- answers that reveal nothing (V2.md 12a) ---------------------------------------------


def _refusal(url: str) -> str:
    with pytest.raises(UnsafeUrl) as refused:
        check_url(url, allow_private=False)
    return str(refused.value)


def test_a_refusal_names_the_rule_never_the_address_the_host_resolved_to():
    with rebinding.installed():
        answers = {
            url: _refusal(url)
            for url in (
                "http://localhost:8080/hooks",  # resolves to 127.0.0.1 and ::1
                "http://127.0.0.1/hooks",
                "http://10.0.3.7/hooks",
                "http://[::ffff:10.0.3.7]/hooks",
                f"http://gone{rebinding.NOWHERE}/hooks",  # does not resolve at all
            )
        }
    for url, answer in answers.items():
        assert answer == HOST_NOT_ALLOWED, url
        for address in ("127.0.0.1", "::1", "10.0.3.7", "ffff"):
            assert address not in answer, (url, answer)
    # A name that does not resolve and one that resolves privately read the same.
    assert len(set(answers.values())) == 1


@pytest.mark.webhook_env(OUTLAST_WEBHOOK_ALLOW_PRIVATE=PRIVATE)
def test_a_refused_webhook_url_answers_422_with_the_field_and_the_rule_only(client, auth):
    response = client.post(
        "/v1/tasks",
        json={"agent": "echo", "input": {"message": "hi"}, "webhook_url": "http://localhost/x"},
        headers=auth,
    )

    assert response.status_code == 422
    body = response.get_json()
    [message] = body["errors"]["webhook_url"]
    assert message.startswith("This address is not allowed for webhooks")
    text = response.get_data(as_text=True)
    assert "127.0.0.1" not in text and "::1" not in text


def test_a_delivery_error_does_not_tell_a_disallowed_address_from_a_refused_connection(
    make_receiver,
):
    # Given: a port nobody listens on (private addresses allowed: an ordinary refused
    # connection), the same address with the guard on, a name that resolves public for the
    # check and loopback for the connection, and a name that does not resolve
    from app.dev.embedded import free_port

    closed = f"http://127.0.0.1:{free_port()}/hooks"
    receiver = make_receiver()
    rebinding_name = f"http://hooks{rebinding.SUFFIX}:{receiver.port}/hooks"

    def error(url: str, allow_private: bool) -> str | None:
        return send(url, b"{}", {}, timeout_seconds=3, allow_private=allow_private).error

    with rebinding.installed():
        errors = {
            "refused": error(closed, True),
            "disallowed": error(receiver.url, False),
            "rebinding": error(rebinding_name, False),
            "unresolvable": error(f"http://gone{rebinding.NOWHERE}/hooks", False),
        }

    # Then every last_error reads the same, and the receiver was never reached
    assert set(errors.values()) == {CONNECTION_REFUSED}, errors
    assert receiver.count() == 0
