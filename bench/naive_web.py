"""The submission baselines (``gunicorn bench.naive_web:app``), served exactly like
Outlast's web process (gthread, same workers and threads):

- ``POST /naive``: parse the JSON body, ``INSERT … ON CONFLICT DO NOTHING`` keyed by the
  ``Idempotency-Key`` header, commit, then ``.delay()`` a Celery task: the usual
  hand-written endpoint, with no auth, no validation, no event and no outbox (and so
  no guarantee that the message follows the commit);
- ``POST /noop``: ``return 202`` alone (the web stack's own ceiling).
"""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa
from flask import Flask, jsonify, request

from bench import baseline_app

app = Flask("naive")


@app.post("/naive")
def naive_submit():
    body = request.get_json(force=True)
    key = request.headers.get("Idempotency-Key") or uuid.uuid4().hex
    submission_id = "sub_" + uuid.uuid4().hex
    with baseline_app.engine().begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO bench_submissions (id, idempotency_key, body) "
                "VALUES (:id, :key, CAST(:body AS jsonb)) "
                "ON CONFLICT (idempotency_key) DO NOTHING"
            ),
            {"id": submission_id, "key": key, "body": json.dumps(body)},
        )
    baseline_app.noop.delay(submission_id)
    return jsonify({"id": submission_id}), 202


@app.post("/noop")
def noop():
    return "", 202


@app.get("/")
def index():
    return "", 200
