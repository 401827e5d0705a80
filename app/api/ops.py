"""Operational endpoints that need no API key: /healthz and /readyz."""

from __future__ import annotations

import sqlalchemy as sa
from celery import current_app as celery_app
from flask import Blueprint, jsonify

from app.store import db

blueprint = Blueprint("ops", __name__)


@blueprint.get("/healthz")
def healthz():
    """200 while the process serves."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz():
    """200 when the database and the broker answer, else 503 naming which does not."""
    checks: dict[str, str] = {}
    try:
        with db.engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            conn.default_channel.client.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    if not ready:
        response.headers["Retry-After"] = "5"
    return response
