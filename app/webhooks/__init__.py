"""Webhooks: signed deliveries of task events, their retries, and the SSRF guard."""
