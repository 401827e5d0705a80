"""The Flask receiver of docs/webhooks.md, run as written, receives a real delivery."""

from __future__ import annotations

import json
import re
import threading
import time

import requests
from werkzeug.serving import make_server

from outlast import webhooks as signing
from tests.conftest import ROOT
from tests.harness import wait_until
from tests.webhooks.helpers import deliveries, finish_task


def _docs_receiver_source() -> str:
    text = (ROOT / "docs" / "webhooks.md").read_text()
    (source,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Flask(" in b]
    return source


def test_docs_flask_receiver_accepts_a_real_delivery_and_refuses_a_forged_one(
    tenant, celery_worker, monkeypatch
):
    monkeypatch.setenv("OUTLAST_WEBHOOK_SECRET", tenant.webhook_secret)
    namespace: dict = {"__name__": "docs_webhook_receiver"}
    exec(compile(_docs_receiver_source(), "docs/webhooks.md", "exec"), namespace)
    server = make_server("127.0.0.1", 0, namespace["app"], threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/outlast"
    try:
        task_id = finish_task(tenant.tenant_id, url, "completed")
        (row,) = wait_until(
            lambda: [r for r in deliveries(task_id) if r["status"] == "delivered"], 20
        )
        assert row["last_status_code"] == 200

        body = json.dumps({"id": "evt_forged"}).encode()
        forged = signing.signature_headers(["whsec_" + "A" * 43 + "="], "evt_forged", body)
        assert requests.post(url, data=body, headers=forged, timeout=5).status_code == 400
        stale = signing.signature_headers(
            [tenant.webhook_secret], "evt_old", body, timestamp=int(time.time()) - 600
        )
        assert requests.post(url, data=body, headers=stale, timeout=5).status_code == 400
        fresh = signing.signature_headers([tenant.webhook_secret], "evt_forged", body)
        answer = requests.post(url, data=body, headers=fresh, timeout=5)
        assert answer.status_code == 200 and answer.json() == {"received": "evt_forged"}
    finally:
        server.shutdown()
        thread.join(5)
