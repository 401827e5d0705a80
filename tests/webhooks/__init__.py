"""Webhook deliveries: signing, sending, retries, replay, the SSRF guard."""
