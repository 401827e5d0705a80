"""The ``celery -A workers.make_celery`` target: a Flask app and its Celery app."""

from app import settings
from app.ops import logs
from workers import signals  # noqa: F401  (connects the worker signal handlers)
from workers.celery_app import create_app

# JSON logs from the first line on: worker, beat and flower import this module before
# they print anything (Celery's setup_logging signal comes later, for worker and beat).
logs.configure(settings.current())
flask_app = create_app()
celery_app = flask_app.extensions["celery"]
