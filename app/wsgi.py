"""The gunicorn target: ``gunicorn app.wsgi:app``."""

from app import create_app, logs, settings

logs.configure(settings.current())
app = create_app()
