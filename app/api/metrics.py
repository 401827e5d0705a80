"""GET /metrics: Prometheus text format (no API key).

Served by whichever web process the scrape reaches: the numbers come from the shared
store (see :mod:`app.ops.metrics`), so every web process answers the same.
"""

from __future__ import annotations

from flask import Blueprint, Response, request
from prometheus_client.exposition import choose_encoder

from app.ops import metrics

blueprint = Blueprint("metrics", __name__)

_registry = None


@blueprint.get("/metrics")
def scrape() -> Response:
    """Every Outlast metric, in the format the scraper asks for (text or OpenMetrics)."""
    global _registry
    if _registry is None:
        _registry = metrics.registry()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(_registry), status=200, headers={"Content-Type": content_type})
