"""The HTTP layer: /v1 blueprints (flask-smorest, so /openapi.json is generated from the
marshmallow schemas) and the operational endpoints."""

from __future__ import annotations

from flask import Flask
from flask_smorest import Api

from app import auth, errors

V1_BLUEPRINTS = ("app.api.tasks", "app.api.events", "app.api.deliveries")


def init_app(flask_app: Flask) -> Api:
    """Register every blueprint, the OpenAPI document, and problem+json errors."""
    import importlib

    flask_app.config.update(
        API_TITLE="Outlast",
        API_VERSION="1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_REDOC_PATH="/docs",
        OPENAPI_REDOC_URL="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js",
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        },
    )
    api = Api(flask_app)
    for module_name in V1_BLUEPRINTS:
        module = importlib.import_module(module_name)
        blueprint = module.blueprint
        # Every /v1 request is authenticated before its view runs.
        blueprint.before_request(auth.authenticate)
        api.register_blueprint(blueprint, url_prefix="/v1")

    from app.api import metrics, ops

    flask_app.register_blueprint(ops.blueprint)
    flask_app.register_blueprint(metrics.blueprint)
    errors.register(flask_app)
    return api
