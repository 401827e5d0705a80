"""The HTTP layer: blueprints for /v1 and the operational endpoints."""
