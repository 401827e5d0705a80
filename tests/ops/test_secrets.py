"""Secrets stay secret (V2.md 12a): no API key, webhook secret or Authorization value in
any process's log, in an error body, an event or a metric label; credential-like query
parameters and ``olk_``/``whsec_`` values are logged as ``[redacted]``."""

from __future__ import annotations

import base64
import json
import logging
import uuid

import pytest
import requests

from app.ops import logs
from app.ops.redaction import REDACTED, RedactionFilter, redact, redact_text
from app.settings import Settings
from app.store import db, tenants
from tests.harness import wait_until
from tests.webhooks.receiver import Receiver

# --- the redaction itself ---------------------------------------------------------------------

KEY = "olk_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v"
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"api_key={KEY}&limit=5", "api_key=[redacted]&limit=5"),
        (
            "access_token=a1&token=b2&key=c3&secret=d4&password=e5&signature=f6&cursor=g7",
            "access_token=[redacted]&token=[redacted]&key=[redacted]&secret=[redacted]"
            "&password=[redacted]&signature=[redacted]&cursor=g7",
        ),
        (
            "client_secret=x&x-api-key=y&monkey=z",
            "client_secret=[redacted]&x-api-key=[redacted]&monkey=z",
        ),
        (f"a key {KEY} in prose", "a key [redacted] in prose"),
        (f"glued:{KEY}, encoded Bearer%20{KEY}", "glued:[redacted], encoded Bearer%20[redacted]"),
        (
            f"{SECRET} and url-encoded {SECRET.replace('=', '%3D')}",
            "[redacted] and url-encoded [redacted]",
        ),
        ("Authorization: Bearer abc.def-123\nnext", "Authorization: [redacted]\nnext"),
        (
            '{"Authorization": "Basic dTpw", "token": "t"}',
            '{"Authorization": "[redacted]", "token": "[redacted]"}',
        ),
        ("{'password': 'hunter2'}", "{'password': '[redacted]'}"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:[redacted]@127.0.0.1:6379/0"),
        ("postgresql://postgres@127.0.0.1/db", "postgresql://postgres@127.0.0.1/db"),
        ("the token expired after a basic check", "the token expired after a basic check"),
    ],
)
def test_redact_text_hides_credentials_and_keeps_the_rest(text, redacted):
    assert redact_text(text) == redacted
    assert redact_text(redacted) == redacted  # idempotent


def test_redact_hides_values_under_credential_names_and_inside_nested_values():
    value = {
        "query": f"api_key={KEY}",
        "headers": {"Authorization": "Bearer zzz", "Accept": "*/*"},
        "list": [KEY, 3, None, {"webhook_secret": "plain"}],
        "count": 2,
    }
    assert redact(value) == {
        "query": "api_key=[redacted]",
        "headers": {"Authorization": REDACTED, "Accept": "*/*"},
        "list": [REDACTED, 3, None, {"webhook_secret": REDACTED}],
        "count": 2,
    }
    # Error bodies keep their field names as keys (by_name=False): only values change.
    assert redact({"errors": {"api_key": [f"bad {KEY}"]}}, by_name=False) == {
        "errors": {"api_key": ["bad [redacted]"]}
    }


@pytest.fixture
def configured_logs(capsys):
    """``logs.configure`` for real (its stderr captured), the root logger restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def configure(log_format: str) -> None:
        logs.configure(Settings(log_format=log_format, log_level="INFO"))

    yield configure
    root.handlers[:], level = saved
    root.setLevel(level)
    logs.clear()


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_every_line_the_configured_handler_writes_is_redacted(configured_logs, capsys, log_format):
    configured_logs(log_format)
    log = logging.getLogger("outlast.test.secrets")
    logs.bind(request_id=KEY)  # a caller-chosen request id is context too

    log.info("calling %s", f"https://example.test/x?api_key={KEY}&page=2")
    log.warning(
        "headers %s",
        {"Authorization": f"Bearer {KEY}"},
        extra={"query": "token=t0ps3cret", "api_key": "plain-value", "secret_value": SECRET},
    )
    try:
        raise ValueError(f"the webhook secret {SECRET} was refused")
    except ValueError:
        log.exception("delivery failed for password=%s", "hunter2")
    log.info({"event": "dict message", "token": "t0ps3cret", "note": KEY})
    logs.clear()

    out = capsys.readouterr().err
    assert len(out.strip().splitlines()) >= 4, out
    for secret in (KEY, SECRET, "t0ps3cret", "hunter2", "plain-value"):
        assert secret not in out, (secret, out)
    assert "api_key=[redacted]&page=2" in out
    assert "the webhook secret [redacted] was refused" in out  # the traceback, redacted
    if log_format == "json":
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        fields = {k: v for line in lines for k, v in line.items()}
        assert fields["query"] == "token=[redacted]" and fields["api_key"] == REDACTED
        assert fields["request_id"] == REDACTED


def test_the_filter_keeps_arguments_formatters_read_and_redacts_them():
    # Celery's lines pass a mapping the console formatter reads (to drop the message id).
    record = logging.makeLogRecord(
        {
            "name": "celery.app.trace",
            "msg": "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
            "args": {"name": "outlast.run_step", "id": "abc", "runtime": 0.5, "return_value": KEY},
        }
    )
    assert RedactionFilter().filter(record) is True
    assert record.args["id"] == "abc" and record.args["return_value"] == REDACTED
    short = logs.ConsoleFormatter("worker").format(record)
    assert short.endswith("outlast.run_step succeeded in 0.5s: [redacted]"), short
    # A credential made of the format and an argument together: the rendered line is kept.
    joined = logging.makeLogRecord({"msg": "GET /x?token=%s", "args": ("plain123",)})
    RedactionFilter().filter(joined)
    assert joined.getMessage() == "GET /x?token=[redacted]"


def test_the_filter_never_drops_a_line_whose_arguments_do_not_fit():
    record = logging.makeLogRecord({"msg": "two %s %s", "args": (KEY,)})
    assert RedactionFilter().filter(record) is True
    assert KEY not in record.getMessage() and "two %s %s" in record.getMessage()


# --- a real stack, grepped --------------------------------------------------------------------


def test_no_log_of_any_process_holds_a_key_or_a_secret_after_careless_requests(
    stack, settings, tenant
):
    # Given web, worker and beat, a tenant with two keys, and a receiver for its webhooks
    with db.transaction() as conn:
        second_key = tenants.issue_key(conn, tenant.tenant_id).api_key
    token, password = f"tok-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
    basic = base64.b64encode(f"ops:{password}".encode()).decode()
    stack.start("web")
    worker = stack.start("worker")
    stack.start("beat")
    stack.wait_ready()
    stack.wait_worker_ready(worker)
    base = stack.base_url
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    answers: list[requests.Response] = []

    def call(method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, base + path, timeout=10, **kwargs)
        answers.append(response)
        return response

    with Receiver() as receiver:
        # When a careless client puts keys and secrets in query strings ...
        for name in ("api_key", "access_token", "token", "key", "secret", "password", "signature"):
            call("GET", f"/v1/tasks?{name}={token}&limit=5", headers=auth)
            call("GET", f"/v1/tasks?limit=5&{name}={tenant.api_key}")
        call("GET", f"/v1/tasks?q={second_key}", headers=auth)
        call("GET", f"/v1/tasks?webhook_secret={tenant.webhook_secret}", headers=auth)
        call("GET", f"/v1/tasks/{second_key}", headers=auth)  # a key in the path
        # ... in headers and cookies ...
        call("GET", "/v1/tasks", headers={"Authorization": f"Bearer {token}"})
        call("GET", "/v1/tasks", headers={"Authorization": f"Basic {basic}"})
        call("GET", "/v1/tasks", headers={**auth, "X-Request-Id": second_key})
        call("GET", "/v1/tasks", cookies={"api_key": tenant.api_key})
        call("GET", "/v1/tasks", headers={"Authorization": f"Bearer {second_key}"})
        # ... and in bodies: a task whose input and metadata carry them, with a webhook
        # whose URL carries a token (delivered, signed with the secret)
        submitted = call(
            "POST",
            "/v1/tasks",
            headers=auth,
            json={
                "agent": "echo",
                "input": {"message": tenant.api_key},
                "metadata": {"note": tenant.webhook_secret, "password": password},
                "webhook_url": f"http://127.0.0.1:{receiver.port}/hooks?token={token}",
            },
        )
        assert submitted.status_code == 202, submitted.text
        unknown_agent = call(
            "POST", "/v1/tasks", headers=auth, json={"agent": second_key, "input": {}}
        )
        broken = call(
            "POST",
            "/v1/tasks",
            headers={**auth, "Content-Type": "application/json"},
            data=f'{{"agent": "echo", "input": {{"message": "{tenant.api_key}"',
        )
        rotated = call("POST", "/v1/webhook-secret/rotate", headers=auth)
        new_secret = rotated.json()["webhook_secret"]
        task_id = submitted.json()["id"]
        wait_until(
            lambda: (
                call("GET", f"/v1/tasks/{task_id}", headers=auth).json()["status"] == "completed"
            ),
            30,
            what="echo completed",
        )
        wait_until(lambda: receiver.count() >= 1, 60, what="the webhook delivered")
        call("GET", f"/v1/tasks/{task_id}/events?token={token}", headers=auth)
        events = call("GET", f"/v1/tasks/{task_id}/events", headers=auth).json()["data"]
        scrape = call("GET", "/metrics").text
    stack.stop_all()  # every line flushed

    secrets = {
        "first key": tenant.api_key,
        "second key": second_key,
        "webhook secret": tenant.webhook_secret,
        "rotated webhook secret": new_secret,
        "query token": token,
        "password": password,
        "basic credentials": basic,
    }
    # Then no process's log holds any of them: every file, every line
    log_files = sorted(stack.log_dir.glob("*.log"))
    assert {p.name.split(".")[0] for p in log_files} == {"web", "worker", "beat"}
    for path in log_files:
        text = path.read_text(errors="replace")
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {path.name}"
    web_log = next(p for p in log_files if p.name.startswith("web")).read_text()
    # (and the lines are there, redacted, not missing)
    assert '"query": "limit=5&api_key=[redacted]"' in web_log
    assert '"query": "token=[redacted]&limit=5"' in web_log
    assert f'"path": "/v1/tasks/{REDACTED}"' in web_log

    # Nor does an error body, an event or a metric label
    assert unknown_agent.status_code == 422 and REDACTED in unknown_agent.text
    for response in answers:
        if response.status_code >= 400:
            for what, secret in secrets.items():
                assert secret not in response.text, (what, response.request.url, response.text)
    assert broken.status_code == 400
    # (an event carries the task as the tenant stored it, its own input included; what
    # Outlast adds never holds a key or a secret)
    event_text = json.dumps(events)
    for secret in (new_secret, second_key, basic):
        assert secret not in event_text
    for what, secret in secrets.items():
        assert secret not in scrape, what
