"""The beat's sweeps, each a Celery task on the ``maintenance`` queue."""
