"""The HTTP layer: the Flask app, /v1 blueprints (flask-smorest, so /openapi.json is
generated from the marshmallow schemas) and the operational endpoints."""

from __future__ import annotations

import http

from flask import Flask, Response, g, request
from flask_smorest import Api
from flask_smorest.utils import prepare_response

from app import errors
from app import settings as settings_mod
from app.api import auth, jsonbody, limits, problems
from app.ops import logs
from app.ops import metrics as recorded_metrics
from app.settings import Settings

V1_BLUEPRINTS = (
    "app.api.tasks",
    "app.api.children",
    "app.api.events",
    "app.api.deliveries",
    "app.api.usage",
    "app.api.agents",
)
DOCS_ASSETS_PATH = "/docs/assets"


class OutlastApi(Api):
    """flask-smorest's Api, documenting errors as they are sent: problem+json."""

    def _register_responses(self) -> None:
        from app.api.schemas import ProblemSchema

        # Reusable responses named after the status (flask-smorest's convention, used
        # by @blp.alt_response and @blp.arguments' 422), plus the "default" error.
        for status in http.HTTPStatus:
            response: dict = {"description": status.phrase}
            if status >= 400:
                response["schema"] = ProblemSchema
            prepare_response(response, self.spec, errors.PROBLEM_JSON)
            self.spec.components.response(status.name, response, lazy=True)
        response = {"description": "An error (RFC 9457 problem)", "schema": ProblemSchema}
        prepare_response(response, self.spec, errors.PROBLEM_JSON)
        self.spec.components.response(self.DEFAULT_ERROR_RESPONSE_NAME, response, lazy=True)


def _authenticate() -> None:
    # A before_request hook that returned the tenant id would end the request with it.
    auth.authenticate()


def _rate_limit() -> None:
    """Count the request against its API key's rate limit (after authentication)."""
    _, _, key = request.headers.get("Authorization", "").partition(" ")
    g.rate_limit = None  # set before the check: a 429 carries its own RateLimit field
    g.rate_limit = limits.check_rate(key.strip())


def _rate_limit_headers(response: Response) -> Response:
    """``RateLimit-Policy`` on every /v1 answer, ``RateLimit`` once a key was counted."""
    if request.path.startswith("/v1/"):
        policy = limits.policy_header(settings_mod.current())
        if policy is not None:
            response.headers["RateLimit-Policy"] = policy
            state = g.get("rate_limit")
            if state is not None and "RateLimit" not in response.headers:
                response.headers["RateLimit"] = limits.state_header(state)
    return response


RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {
        "description": "IETF draft-ietf-httpapi-ratelimit-headers (-08 and later): the "
        'per-key policy, e.g. "per-key";q=200;w=2 (omitted when rate limiting is off).',
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'What is left of the quota and when more comes: "per-key";r=0;t=1.',
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
}


def _document_rate_limits(api: Api) -> None:
    """Every /v1 operation may answer 429 (rate limit per key, waiters per tenant)."""
    api.spec.components.response(
        "RATE_LIMITED",
        {
            "description": "Too many requests (code rate_limited): the API key's rate limit, "
            "or the tenant's cap on long polls and event streams; retry after Retry-After.",
            "content": {errors.PROBLEM_JSON: {"schema": "Problem"}},
            "headers": RATE_LIMIT_HEADERS,
        },
    )
    # OpenAPI links from a submitted task to what can be done with it (clients and
    # schemathesis' stateful runs follow them).
    submitted = api.spec._paths.get("/v1/tasks", {}).get("post", {}).get("responses", {})
    accepted = submitted.get("202")
    if isinstance(accepted, dict):
        task_id = {"task_id": "$response.body#/id"}
        accepted["links"] = {
            operation_id: {"operationId": operation_id, "parameters": task_id}
            for name, operation_id in _operation_ids(api).items()
            if name.startswith("/v1/tasks/{task_id}")
        }
    for path, operations in api.spec._paths.items():
        if not path.startswith("/v1/"):
            continue
        for operation in operations.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"].setdefault(
                    "429", {"$ref": "#/components/responses/RATE_LIMITED"}
                )


def _operation_ids(api: Api) -> dict[str, str]:
    """``{"path method": operationId}`` of the /v1 operations, ids set where missing."""
    ids = {}
    for path, operations in api.spec._paths.items():
        for method, operation in operations.items():
            if path.startswith("/v1/") and isinstance(operation, dict):
                operation_id = operation.setdefault(
                    "operationId",
                    "_".join([method, *(p.strip("{}") for p in path.split("/")[2:])]),
                )
                ids[f"{path} {method}"] = operation_id
    return ids


def _docs_asset(filename: str):
    """Swagger UI's JavaScript and CSS, from the flask-swagger-ui package."""
    from pathlib import Path

    import flask_swagger_ui
    from flask import send_from_directory

    return send_from_directory(Path(flask_swagger_ui.__file__).parent / "dist", filename)


def init_app(flask_app: Flask) -> Api:
    """Register every blueprint, the OpenAPI document, and problem+json errors."""
    import importlib

    flask_app.config.update(
        API_TITLE="Outlast",
        API_VERSION="1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        # Swagger UI served from the flask-swagger-ui wheel's assets: /docs renders on a
        # machine with no internet access.
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=DOCS_ASSETS_PATH + "/",
        API_SPEC_OPTIONS={
            "info": {
                # Markdown (Swagger UI renders it): code spans keep `<api key>` as text
                # instead of an HTML tag that swallowed it.
                "description": "Durable, checkpointed execution of long-running AI agent "
                "tasks. Every `/v1` request needs `Authorization: Bearer <api key>`."
            },
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        },
    )
    api = OutlastApi(flask_app)
    for module_name in V1_BLUEPRINTS:
        module = importlib.import_module(module_name)
        blueprint = module.blueprint
        # Every /v1 request is authenticated before its view runs.
        # Blueprints are module objects shared by every app a process creates (tests make
        # one per test): a setup method may only run before the first registration.
        if _authenticate not in blueprint.before_request_funcs.get(None, []):
            blueprint.before_request(_authenticate)
            blueprint.before_request(_rate_limit)
            blueprint.before_request(jsonbody.check_any_body)  # no parser sees a bad body
        api.register_blueprint(blueprint, url_prefix="/v1")

    _document_rate_limits(api)

    from app.api import metrics, ops

    flask_app.register_blueprint(ops.blueprint)
    flask_app.register_blueprint(metrics.blueprint)
    flask_app.add_url_rule(
        f"{DOCS_ASSETS_PATH}/<path:filename>", "docs_assets", _docs_asset, methods=["GET"]
    )
    flask_app.after_request(_rate_limit_headers)
    logs.init_app(flask_app)  # a request id on every web log line and as X-Request-Id
    problems.register(flask_app)
    return api


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask application for ``settings`` (the process's settings by default).

    It has no Celery app of its own: the process that serves it attaches one
    (``workers.wsgi``, ``workers.make_celery``), and the store publishes through
    ``celery.current_app``.
    """
    settings = settings_mod.configure(settings or settings_mod.current())
    flask_app = Flask("outlast")
    flask_app.config["OUTLAST_SETTINGS"] = settings
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    init_app(flask_app)
    recorded_metrics.install()  # count the events this process commits
    return flask_app
