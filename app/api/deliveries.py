"""/v1 deliveries endpoints."""

from flask_smorest import Blueprint

blueprint = Blueprint("deliveries", __name__, description="deliveries")
