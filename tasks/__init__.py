"""The Celery tasks: agent steps, webhook deliveries, and the beat's sweeps."""
