"""GET /metrics: Prometheus text format (no API key)."""

from flask import Blueprint

blueprint = Blueprint("metrics", __name__)
