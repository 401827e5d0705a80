"""The Celery side: the Celery app, its configuration, the beat schedule, worker signals."""
