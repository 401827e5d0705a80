"""Benchmarks: Outlast measured beside raw Celery, a hand-rolled checkpoint chain and DBOS,
in the same run on the same machine (``make bench``; see docs/benchmarks.md)."""
