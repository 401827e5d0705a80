"""/v1/agents: every agent version, its input schema, this tenant's tasks in flight on
it and the live workers that can take it (V2.md section 7).

The versions listed are those this web process registers, those a live worker
advertises (``worker_heartbeats``, see :mod:`app.store.fleet`) and those this tenant
has tasks in flight on; another tenant's tasks are neither counted nor used to list a
version.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api import schemas
from app.api.auth import current_tenant
from app.engine import registry
from app.store import db, fleet

blueprint = Blueprint(
    "agents", __name__, description="Agent versions, their tasks in flight and workers."
)


def agent_versions(tenant_id: str) -> list[dict[str, Any]]:
    """The body's ``data``: agents by name, each with its versions oldest first."""
    with db.engine().connect() as conn:
        workers = fleet.live_workers(conn)
        in_flight = fleet.tasks_in_flight(conn, tenant_id)
    known: set[tuple[str, str]] = set(workers) | set(in_flight)
    for name in registry.names():
        known.update((name, version) for version in registry.versions(name))
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for name, version in sorted(known, key=lambda p: (p[0], registry.version_key(p[1]))):
        code = registry.get_agent(name, version)
        by_agent.setdefault(name, []).append(
            {
                "version": version,
                "input_schema": dict(code.input_schema) if code is not None else None,
                "tasks_in_flight": in_flight.get((name, version), 0),
                "workers": workers.get((name, version), 0),
            }
        )
    return [{"name": name, "versions": versions} for name, versions in by_agent.items()]


@blueprint.route("/agents")
class AgentCollection(MethodView):
    @blueprint.response(200, schemas.AgentListSchema)
    def get(self) -> Response:
        """List agent versions.

        Every agent and version that this web process registers, that a live worker
        advertises, or that has tasks of this tenant in flight; for each, those tasks
        and how many live workers can run it or migrate from it.
        """
        body = {"data": agent_versions(current_tenant())}
        return Response(json.dumps(body), status=200, mimetype="application/json")
