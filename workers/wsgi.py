"""The gunicorn target: ``gunicorn 'workers.wsgi:create_web_app()'``."""

from __future__ import annotations

from flask import Flask

from app import settings
from app.ops import logs
from workers.celery_app import create_app


def create_web_app() -> Flask:
    """The web process's app: JSON logs first, then the Flask app and its Celery app."""
    logs.configure(settings.current())
    return create_app()
