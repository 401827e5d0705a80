"""Observability: metrics shared through Redis, and log lines with the task on each."""
