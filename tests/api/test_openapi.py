"""/openapi.json is a valid OpenAPI 3 document of every /v1 endpoint; the API never
answers anything it does not describe (schemathesis); errors are problem+json."""

from __future__ import annotations

import re

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from openapi_spec_validator import validate

from tests.api.conftest import ask_for_input, assert_problem, complete


def v1_routes(flask_app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every /v1 rule the app serves."""
    routes = set()
    for rule in flask_app.url_map.iter_rules():
        if rule.rule.startswith("/v1/"):
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                routes.add((path, method.lower()))
    return routes


def test_openapi_document_is_valid_openapi_3(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    validate(document)


def test_openapi_document_lists_every_v1_path_and_method(client, flask_app):
    document = client.get("/openapi.json").get_json()
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    served = v1_routes(flask_app)
    assert served, "no /v1 route"
    assert served <= documented, served - documented
    for path in [
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/steps",
        "/v1/tasks/{task_id}/cancel",
        "/v1/tasks/{task_id}/input",
        "/v1/tasks/{task_id}/events",
        "/v1/tasks/{task_id}/ack",
    ]:
        assert path in document["paths"], path


def test_openapi_document_describes_problems_and_bearer_auth(client):
    document = client.get("/openapi.json").get_json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    default_error = document["components"]["responses"]["DEFAULT_ERROR"]
    assert "application/problem+json" in default_error["content"]
    submit = document["paths"]["/v1/tasks"]["post"]
    assert set(submit["responses"]) >= {"202", "400", "409", "413", "415", "422", "503"}
    assert {"Location", "Idempotent-Replayed"} <= set(submit["responses"]["202"]["headers"])


def test_docs_page_renders_the_document_with_assets_served_locally(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "openapi.json" in page
    assert "https://" not in page  # nothing loaded from the internet
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs/assets/{asset}" in page
        served = client.get(f"/docs/assets/{asset}")
        assert served.status_code == 200 and len(served.get_data()) > 10_000
    assert client.get("/docs/assets/../../setup.cfg").status_code == 404


def test_unknown_route_is_404_problem(client, auth):
    assert_problem(client.get("/nowhere"), 404, "not_found")
    assert_problem(client.get("/v1/nowhere", headers=auth), 404, "not_found")


def test_wrong_method_is_405_problem_with_allow(client, auth):
    response = client.delete("/v1/tasks", headers=auth)
    assert_problem(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
    assert_problem(client.put("/v1/tasks/tsk_x/cancel", headers=auth), 405, "method_not_allowed")


# --- schemathesis ---------------------------------------------------------------------------

# Generated cases per mode (about 30 s each on this shared machine); the stateful run's
# scenarios and steps per scenario.
MAX_EXAMPLES = 150
STATEFUL_SCENARIOS = 25
STATEFUL_STEPS = 6
# The rate limit is on (its fields are in every answer) but out of the way.
HIGH_RATE_LIMIT = 100_000


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(
    make_app, auth, mode
):
    """Every generated request (valid by the document, or deliberately not) gets an
    answer the document describes: a documented status, content type, headers and
    body schema, never a 5xx."""
    flask_app = make_app(rate_limit_per_second=HIGH_RATE_LIMIT)
    client = flask_app.test_client()
    # Some real ids, so that cases reach past the 404 of a random id: pending, cancelled,
    # waiting for input, completed.
    task_ids = [
        client.post(
            "/v1/tasks", json={"agent": "echo", "input": {"message": "m"}}, headers=auth
        ).get_json()["id"]
        for _ in range(4)
    ]
    client.post(f"/v1/tasks/{task_ids[1]}/cancel", headers=auth)
    ask_for_input(task_ids[2])
    complete(task_ids[3])
    schema = schemathesis.openapi.from_wsgi("/openapi.json", flask_app)
    document = client.get("/openapi.json").get_json()
    from schemathesis.specs.openapi.checks import negative_data_rejection

    generation_mode = (
        schemathesis.GenerationMode.POSITIVE
        if mode == "positive"
        else schemathesis.GenerationMode.NEGATIVE
    )
    strategy = st.one_of(
        schema.as_strategy(generation_mode=generation_mode),
        schema.as_strategy(
            generation_mode=generation_mode,
            path_parameters={"task_id": task_ids[0]},
        ),
        *(
            schema.as_strategy(generation_mode=generation_mode, path_parameters={"task_id": t})
            for t in task_ids[1:]
        ),
        # Valid submissions with generated headers (Idempotency-Key) and metadata.
        schema["/v1/tasks"]["POST"].as_strategy(
            generation_mode=generation_mode,
            body={"agent": "echo", "input": {"message": "generated"}},
        ),
    )

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def run(case) -> None:
        without_long_waits(case)
        excluded = EXCLUDED_CHECKS
        documented = {
            p["name"]
            for p in document["paths"][case.path][case.method.lower()].get("parameters", [])
            if p["in"] == "query"
        }
        if set(case.query or {}) - documented:
            # Unknown query parameters are ignored, as most APIs do (API.md is silent);
            # everything else negative in the same case is still checked by the others.
            excluded = [*EXCLUDED_CHECKS, negative_data_rejection]
        response = case.call_and_validate(headers=auth, excluded_checks=excluded)
        statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

    # Valid submissions on their own too: which branch of one_of a draw takes shifts
    # with every schema change, and a run that happened to draw none proved nothing.
    submissions = schema["/v1/tasks"]["POST"].as_strategy(
        generation_mode=generation_mode,
        body={"agent": "echo", "input": {"message": "generated"}},
    )

    @hypothesis.settings(
        max_examples=10,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=submissions)
    def run_submissions(case) -> None:
        without_long_waits(case)
        response = case.call_and_validate(headers=auth, excluded_checks=EXCLUDED_CHECKS)
        statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

    statuses: dict[str, set[int]] = {}
    run()
    run_submissions()
    # The run reached every operation, authenticated, and past the 404 of random ids.
    seen = set().union(*statuses.values())
    operations = sum(1 for result in schema.get_all_operations() if result.ok())
    if mode == "positive":
        assert len(statuses) == operations, statuses
        assert 401 not in seen, statuses  # (negative cases may corrupt the Authorization)
        assert {200, 202} <= statuses["GET /v1/tasks"] | statuses["POST /v1/tasks"], statuses
    else:  # an operation with nothing to negate but its path id may get no case
        assert len(statuses) >= operations // 2, statuses
    assert 422 in seen, statuses


def without_long_waits(case) -> None:
    """No worker runs in these tests: a long poll (bounded by the document at 30 s) or an
    honoured ``Prefer: wait`` (60 s) would only sleep. Keep the runs short."""
    if case.query and "wait" in case.query:
        case.query["wait"] = 0
    if case.headers and "Prefer" in case.headers:
        del case.headers["Prefer"]


def _excluded_checks() -> list:
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # An agent's input schema is per agent and not in the document, so a body the
    # document allows (e.g. agent "abc") is rightly refused with a 422.
    return [positive_data_acceptance]


EXCLUDED_CHECKS = _excluded_checks()


@pytest.mark.slow
def test_schemathesis_stateful_runs_along_the_links_find_no_server_error(make_app, auth):
    """Scenarios that submit a task and follow the document's links from the 202 (read,
    steps, events, cancel, input, deliveries, replay) get only documented answers."""
    flask_app = make_app(rate_limit_per_second=HIGH_RATE_LIMIT)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", flask_app)
    document = flask_app.test_client().get("/openapi.json").get_json()
    links = document["paths"]["/v1/tasks"]["post"]["responses"]["202"]["links"]
    assert len(links) >= 7, links
    calls: list[tuple[str, int]] = []
    from schemathesis.specs.openapi.checks import ignored_auth

    class Scenarios(schema.as_state_machine()):
        def before_call(self, case) -> None:
            without_long_waits(case)
            case.headers = {**(case.headers or {}), **auth}
            if case.method == "POST" and case.path == "/v1/tasks":
                # Agents' input schemas are not in the document: submit a valid task, so
                # that scenarios go on along the 202's links.
                case.body = {"agent": "echo", "input": {"message": "stateful"}}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            calls.append((f"{case.method} {case.path}", response.status_code))
            # ignored_auth takes our real key, set here, for a generated one (tests/api/
            # test_auth.py covers the 401s).
            case.validate_response(response, excluded_checks=[*EXCLUDED_CHECKS, ignored_auth])

    Scenarios.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
    # The links were followed to a real task: some call on /v1/tasks/{task_id}... succeeded
    followed = {op for op, status in calls if "{task_id}" in op and status < 300}
    assert followed, calls
    assert not [c for c in calls if c[1] >= 500], calls
