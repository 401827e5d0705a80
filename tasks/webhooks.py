"""The webhook delivery task (``outlast.deliver_webhook``)."""
