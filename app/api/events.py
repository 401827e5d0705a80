"""/v1 events endpoints."""

from flask_smorest import Blueprint

blueprint = Blueprint("events", __name__, description="events")
