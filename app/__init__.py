"""The Flask API and the domain model it serves (tasks, agents, steps, webhooks)."""

from __future__ import annotations

from flask import Flask

from app import settings as settings_mod
from app.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask application, with its Celery app in ``app.extensions["celery"]``."""
    from workers.celery_app import celery_init_app

    settings = settings_mod.configure(settings or settings_mod.current())
    flask_app = Flask("outlast")
    flask_app.config["OUTLAST_SETTINGS"] = settings
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    celery_init_app(flask_app, settings)

    from app import api

    api.init_app(flask_app)
    return flask_app
