"""The marshmallow schemas of the HTTP API: request validation and, through
flask-smorest/apispec, the OpenAPI document at ``/openapi.json``.

Request schemas (``*Request``, ``*Query``) validate what clients send; their errors
become ``422`` problems with ``errors: {dotted.path: [messages]}``. Response schemas
describe the JSON that :mod:`app.store.representation` builds; views serialize with that
module and use these for the document only, so the two cannot drift apart silently:
the schemathesis test checks every answer against the document.
"""

from __future__ import annotations

from typing import Any

from marshmallow import (
    INCLUDE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

from app.store.lifecycle import Status

MAX_METADATA_KEYS = 32
MAX_TIMEOUT_SECONDS = 604800
MAX_URL_LENGTH = 2048
MAX_AGENT_NAME_LENGTH = 200
TASK_STATUSES = [s.value for s in Status]
EVENT_TYPES = [
    "task.created",
    "task.started",
    "task.step.completed",
    "task.progress",
    "task.input_required",
    "task.resumed",
    "task.retrying",
    "task.completed",
    "task.failed",
    "task.cancelled",
    "task.migrated",
    "task.compensating",
]


# --- requests ---------------------------------------------------------------------------


class BudgetSchema(Schema):
    """A task's budget (V2.md section 3): every limit optional, each an integer >= 1."""

    max_model_calls = fields.Integer(strict=True, validate=validate.Range(min=1))
    max_tool_calls = fields.Integer(strict=True, validate=validate.Range(min=1))
    max_total_tokens = fields.Integer(
        strict=True,
        validate=validate.Range(min=1),
        metadata={"description": "Checked before each model call against input + output tokens."},
    )
    max_steps = fields.Integer(strict=True, validate=validate.Range(min=1))
    on_exhausted = fields.String(
        load_default="fail",
        validate=validate.OneOf(["fail", "ask"]),
        metadata={
            "description": "fail: the task fails with budget_exceeded; ask: input_required "
            'with reason "budget" (answer {"extend": {...}} or {"stop": true}).'
        },
    )


class CreateTaskRequest(Schema):
    """The body of ``POST /v1/tasks``. Unknown fields are refused (a typo such as
    ``timeout`` for ``timeout_seconds`` must not be silently ignored)."""

    agent = fields.String(
        required=True,
        validate=validate.Length(min=1, max=MAX_AGENT_NAME_LENGTH),
        metadata={"description": "A registered agent's name.", "example": "echo"},
    )
    input = fields.Dict(
        keys=fields.String(),
        load_default=dict,
        metadata={
            "description": "Validated against the agent's input schema.",
            "example": {"message": "hello"},
        },
    )
    metadata = fields.Dict(
        keys=fields.String(),
        load_default=dict,
        validate=validate.Length(
            max=MAX_METADATA_KEYS, error=f"Must have at most {MAX_METADATA_KEYS} keys."
        ),
        metadata={"description": f"Stored and returned as is; at most {MAX_METADATA_KEYS} keys."},
    )
    webhook_url = fields.String(
        allow_none=True,
        load_default=None,
        validate=validate.Length(min=1, max=MAX_URL_LENGTH),
        metadata={
            "description": "http(s) URL that receives signed events; private, loopback, "
            "link-local, multicast and reserved hosts are refused."
        },
    )
    timeout_seconds = fields.Integer(
        strict=True,
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=1, max=MAX_TIMEOUT_SECONDS),
        metadata={"description": "Wall-clock deadline for the whole task."},
    )
    budget = fields.Nested(
        BudgetSchema,
        allow_none=True,
        load_default=None,
        metadata={"description": "Limits the worker enforces before each call and step."},
    )

    @validates("agent")
    def _agent_is_registered(self, value: str, **_: Any) -> None:
        from app.engine.registry import get_agent

        if get_agent(value) is None:
            raise ValidationError(f"Unknown agent {value!r}.")

    @validates("webhook_url")
    def _webhook_url_is_safe(self, value: str | None, **_: Any) -> None:
        from app import settings as settings_mod
        from app.webhooks.urlguard import UnsafeUrl, check_url

        if value is None:
            return
        try:
            check_url(value, allow_private=settings_mod.current().webhook_allow_private)
        except UnsafeUrl as exc:
            # The rule, never the address the host resolved to (V2.md 12a).
            raise ValidationError(f"This address is not allowed for webhooks: {exc}.") from None

    @validates_schema(skip_on_field_errors=True)
    def _input_matches_agent_schema(self, data: dict[str, Any], **_: Any) -> None:
        from app.engine.registry import check_input, get_agent

        agent = get_agent(data["agent"])
        if agent is None:  # unregistered between the two checks
            raise ValidationError(f"Unknown agent {data['agent']!r}.", "agent")
        errors = check_input(agent, data["input"])
        if errors:
            # Already dotted ("input.message"); flattened as they are.
            raise ValidationError(errors)

    @post_load
    def _pin_agent_version(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        # V2.md 7: the task runs on the version this process registers (its newest),
        # the one whose input schema was just checked.
        from app.engine.registry import get_agent

        agent = get_agent(data["agent"])
        if agent is not None:
            data["agent_version"] = agent.version
        return data


class SubmitInputRequest(Schema):
    """The body of ``POST /v1/tasks/{id}/input``."""

    input = fields.Raw(
        required=True,
        allow_none=True,
        metadata={
            "description": "The answer; validated against the task's input_request.schema.",
            "example": {"approved": True},
        },
    )


class ListTasksQuery(Schema):
    status = fields.String(validate=validate.OneOf(TASK_STATUSES))
    agent = fields.String(
        validate=[
            validate.Length(min=1, max=MAX_AGENT_NAME_LENGTH),
            # PostgreSQL refuses NUL in a text parameter (that was a 500).
            validate.Regexp(r"^[^\x00]*$", error="Must not contain the NUL character."),
        ]
    )
    acknowledged = fields.Boolean(
        metadata={
            "description": "false: terminal tasks not yet acknowledged (POST "
            "/v1/tasks/{id}/ack); true: acknowledged tasks. Absent: every task."
        },
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(
        validate=validate.Length(min=1, max=512),
        metadata={"description": "next_cursor of the previous page (opaque)."},
    )


class ListChildrenQuery(Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(
        validate=validate.Length(min=1, max=512),
        metadata={"description": "next_cursor of the previous page (opaque)."},
    )


class GetTaskQuery(Schema):
    wait = fields.Float(
        allow_nan=False,
        validate=validate.Range(min=0, max=30),
        metadata={
            "description": "Long poll: answer as soon as the status or step changes, "
            "or after this many seconds (0 to 30)."
        },
    )


class ListEventsQuery(Schema):
    after = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=2**31 - 1),
        metadata={"description": "Only events with seq greater than this."},
    )
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


# --- responses (documentation of app.store.representation's JSON) ------------------------------


class ProgressSchema(Schema):
    class Meta:
        unknown = INCLUDE

    current = fields.Raw(allow_none=True)
    total = fields.Raw(allow_none=True)
    message = fields.String(allow_none=True)


class TaskErrorSchema(Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True)
    message = fields.String(required=True)


class InputRequestSchema(Schema):
    class Meta:
        unknown = INCLUDE

    prompt = fields.String(required=True)
    schema = fields.Dict(required=True)
    reason = fields.String(
        metadata={"description": "Why it asks, when the engine asks: ask_human, budget."}
    )


class UsageSchema(Schema):
    model_calls = fields.Integer(required=True)
    tool_calls = fields.Integer(required=True)
    input_tokens = fields.Integer(required=True)
    output_tokens = fields.Integer(required=True)


class TaskBudgetSchema(Schema):
    class Meta:
        unknown = INCLUDE

    max_model_calls = fields.Integer()
    max_tool_calls = fields.Integer()
    max_total_tokens = fields.Integer()
    max_steps = fields.Integer()
    on_exhausted = fields.String(required=True, validate=validate.OneOf(["fail", "ask"]))


class CompensationSchema(Schema):
    """What a failed or cancelled task undid (V2.md section 5)."""

    reason = fields.String(required=True, validate=validate.OneOf(["failed", "cancelled"]))
    total = fields.Integer(required=True, metadata={"description": "Calls to undo."})
    done = fields.Integer(required=True, metadata={"description": "Undos completed."})
    failed = fields.Integer(
        required=True,
        metadata={"description": "Undos that failed for good (a 4xx, or out of retries)."},
    )


class TaskSchema(Schema):
    """The task object of API.md."""

    id = fields.String(required=True, metadata={"example": "tsk_01hq3k..."})
    object = fields.String(required=True, validate=validate.OneOf(["task"]))
    agent = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    input = fields.Dict(required=True)
    metadata = fields.Dict(required=True)
    step = fields.Integer(required=True, metadata={"description": "Steps checkpointed so far."})
    progress = fields.Nested(ProgressSchema, required=True, allow_none=True)
    result = fields.Raw(required=True, allow_none=True)
    error = fields.Nested(TaskErrorSchema, required=True, allow_none=True)
    input_request = fields.Nested(InputRequestSchema, required=True, allow_none=True)
    attempt = fields.Integer(required=True)
    webhook_url = fields.String(required=True, allow_none=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)
    started_at = fields.DateTime(required=True, allow_none=True)
    finished_at = fields.DateTime(required=True, allow_none=True)
    usage = fields.Nested(
        UsageSchema,
        required=True,
        metadata={"description": "What the task spent: each completed call counted once."},
    )
    budget = fields.Nested(TaskBudgetSchema, required=True, allow_none=True)
    agent_version = fields.String(
        required=True, metadata={"description": "The agent version this task runs on."}
    )
    acknowledged_at = fields.DateTime(
        required=True,
        allow_none=True,
        metadata={
            "description": "When the client acknowledged the result (POST "
            "/v1/tasks/{id}/ack); the task is purged OUTLAST_TASK_RETENTION_DAYS after it."
        },
    )
    compensation = fields.Nested(
        CompensationSchema,
        required=True,
        allow_none=True,
        metadata={
            "description": "null when nothing was to be undone; else set on entry to "
            "compensating and kept on the terminal task."
        },
    )
    parent_id = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "The task that spawned this one (ctx.spawn), else null."},
    )


class TaskPageSchema(Schema):
    data = fields.List(fields.Nested(TaskSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class ToolCallSchema(Schema):
    index = fields.Integer(required=True)
    name = fields.String(required=True)
    idempotency_key = fields.String(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(["started", "completed", "failed"])
    )
    kind = fields.String(
        required=True,
        validate=validate.OneOf(["call", "compensation"]),
        metadata={"description": "compensation: the undo of the call at this index."},
    )


class StepSchema(Schema):
    index = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["completed"]))
    started_at = fields.DateTime(required=True)
    finished_at = fields.DateTime(required=True)
    tool_calls = fields.List(fields.Nested(ToolCallSchema), required=True)


class StepListSchema(Schema):
    data = fields.List(fields.Nested(StepSchema), required=True)


class EventTaskSchema(TaskSchema):
    """The task as events and webhooks carry it: without ``input`` (V2.md 8), which is
    in GET /v1/tasks/{id}."""

    class Meta:
        exclude = ("input",)


class EventDataSchema(Schema):
    task = fields.Nested(EventTaskSchema, required=True)
    from_version = fields.String(metadata={"description": "task.migrated: the version left."})
    to_version = fields.String(metadata={"description": "task.migrated: the version now run."})


class EventSchema(Schema):
    id = fields.String(required=True)
    type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    task_id = fields.String(required=True)
    seq = fields.Integer(required=True)
    timestamp = fields.DateTime(required=True)
    data = fields.Nested(EventDataSchema, required=True)


class EventPageSchema(Schema):
    data = fields.List(fields.Nested(EventSchema), required=True)
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "The last returned seq, to pass back as after; null at the end."},
    )


class AgentVersionSchema(Schema):
    version = fields.String(required=True)
    input_schema = fields.Dict(
        required=True,
        allow_none=True,
        metadata={"description": "null where the answering process lacks this version's code."},
    )
    tasks_in_flight = fields.Integer(
        required=True, metadata={"description": "This tenant's tasks not yet terminal on it."}
    )
    workers = fields.Integer(
        required=True,
        metadata={"description": "Live workers that can run this version or migrate from it."},
    )


class AgentSchema(Schema):
    name = fields.String(required=True)
    versions = fields.List(fields.Nested(AgentVersionSchema), required=True)


class AgentListSchema(Schema):
    data = fields.List(fields.Nested(AgentSchema), required=True)


class ProblemSchema(Schema):
    """An RFC 9457 problem (``application/problem+json``) with a stable ``code``."""

    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    code = fields.String(
        required=True,
        metadata={
            "description": "Stable machine-readable code: validation_error, invalid_json, "
            "invalid_idempotency_key, unsupported_media_type, payload_too_large, "
            "unauthorized, not_found, idempotency_key_reused, idempotency_key_in_flight, "
            "task_terminal, task_not_waiting, task_not_terminal, unavailable, rate_limited, "
            "method_not_allowed."
        },
    )
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Every 422 has it: {field: [messages]}, dotted paths."},
    )
