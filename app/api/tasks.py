"""/v1 tasks endpoints."""

from flask_smorest import Blueprint

blueprint = Blueprint("tasks", __name__, description="tasks")
