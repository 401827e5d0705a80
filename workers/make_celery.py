"""The ``celery -A workers.make_celery`` target: a Flask app and its Celery app."""

from app import create_app
from workers import signals  # noqa: F401  (connects the worker signal handlers)

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
