"""The initial Outlast schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Every table the API and the sweeps touch, with an index for each query they run.
The SQL is written out so that what the database enforces is visible in one place.
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE TYPE task_status AS ENUM (
    'pending',         -- accepted and stored; a step message is queued or about to be
    'working',         -- a worker has started it (steps run, or are queued between steps)
    'input_required',  -- waiting for POST /input; holds no worker
    'completed',       -- terminal: result is set
    'failed',          -- terminal: error is set
    'cancelled'        -- terminal: cancelled by the client
);
COMMENT ON TYPE task_status IS 'Mirrors app.lifecycle.Status; terminal states never change again.';

CREATE TYPE delivery_status AS ENUM ('pending', 'delivered', 'failed');

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_hash    text NOT NULL UNIQUE,          -- sha256 hex of the plain key; the key is never stored
    key_prefix  text NOT NULL,                 -- first characters, to tell keys apart in listings
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE webhook_secrets (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    secret      text NOT NULL,                 -- whsec_<base64>; needed in clear to sign
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz                    -- NULL: current; set when rotated out
);
CREATE INDEX webhook_secrets_tenant ON webhook_secrets (tenant_id, created_at DESC);

CREATE TABLE tasks (
    id               text PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    agent            text NOT NULL,
    status           task_status NOT NULL DEFAULT 'pending',
    input            jsonb NOT NULL DEFAULT '{}',
    metadata         jsonb NOT NULL DEFAULT '{}',
    step             integer NOT NULL DEFAULT 0,     -- steps completed and checkpointed
    progress         jsonb,
    result           jsonb,
    error            jsonb,
    input_request    jsonb,
    human_input      jsonb,                          -- the answer to input_request, for the next step
    attempt          integer NOT NULL DEFAULT 1,     -- 1 + resumptions after a lost worker
    step_retries     integer NOT NULL DEFAULT 0,     -- transient retries used by the current step
    webhook_url      text,
    timeout_seconds  integer,
    deadline_at      timestamptz,
    lease_token      text,                           -- fencing token of the step being run
    lease_expires_at timestamptz,
    wake_at          timestamptz,                    -- durable timer / retry backoff: next step due
    dispatched_at    timestamptz,                    -- last time a step message was queued
    last_seq         integer NOT NULL DEFAULT 0,     -- seq of the newest event
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT tasks_result_iff_completed CHECK ((status = 'completed') = (result IS NOT NULL)),
    CONSTRAINT tasks_error_iff_failed CHECK ((status = 'failed') = (error IS NOT NULL)),
    CONSTRAINT tasks_input_request_iff_waiting
        CHECK ((status = 'input_required') = (input_request IS NOT NULL))
);
-- GET /v1/tasks, newest first, optionally filtered; (created_at, id) is the cursor.
CREATE INDEX tasks_tenant_created ON tasks (tenant_id, created_at DESC, id DESC);
CREATE INDEX tasks_tenant_status_created ON tasks (tenant_id, status, created_at DESC, id DESC);
CREATE INDEX tasks_tenant_agent_created ON tasks (tenant_id, agent, created_at DESC, id DESC);
-- Reaper: expired leases of running steps.
CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at)
    WHERE lease_token IS NOT NULL;
-- Timer sweep: sleeping tasks and step retries that are due.
CREATE INDEX tasks_wake ON tasks (wake_at) WHERE wake_at IS NOT NULL;
-- Deadline sweep.
CREATE INDEX tasks_deadline ON tasks (deadline_at)
    WHERE deadline_at IS NOT NULL AND status IN ('pending', 'working', 'input_required');
-- Lost-message sweep: queued steps nobody picked up.
CREATE INDEX tasks_dispatched ON tasks (dispatched_at)
    WHERE lease_token IS NULL AND wake_at IS NULL AND status IN ('pending', 'working');
-- Retention purge.
CREATE INDEX tasks_finished ON tasks (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

CREATE TABLE checkpoints (
    task_id      text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step_index   integer NOT NULL,               -- 0-based; the row is written when the step completes
    state        jsonb,                          -- the state the next step starts from
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, step_index)
);

CREATE TABLE tool_calls (
    task_id          text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    step_index       integer NOT NULL,
    call_index       integer NOT NULL,
    name             text NOT NULL,
    idempotency_key  text NOT NULL,
    status           text NOT NULL CHECK (status IN ('started', 'completed', 'failed')),
    args             jsonb,
    output           jsonb,
    error            jsonb,
    attempts         integer NOT NULL DEFAULT 1,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    PRIMARY KEY (task_id, step_index, call_index)
);

CREATE TABLE events (
    task_id     text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq         integer NOT NULL,                -- 1, 2, 3 ... within a task
    id          text NOT NULL UNIQUE,            -- evt_...; the webhook-id
    type        text NOT NULL,
    data        jsonb NOT NULL,                  -- {"task": <the task right after the change>}
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, seq)
);

CREATE TABLE idempotency_keys (
    tenant_id    text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key          text NOT NULL,
    fingerprint  text NOT NULL,                  -- sha256 of the canonical request JSON
    task_id      text REFERENCES tasks (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Transactional outbox: a Celery message to publish, written in the transaction
-- that makes it necessary; deleted once the broker has it.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    task_name   text NOT NULL,                   -- Celery task name
    queue       text NOT NULL,
    args        jsonb NOT NULL DEFAULT '[]',
    task_id     text REFERENCES tasks (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_created ON outbox (created_at);

CREATE TABLE webhook_deliveries (
    id                text PRIMARY KEY,          -- dlv_...
    tenant_id         text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    task_id           text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    event_id          text NOT NULL,
    event_seq         integer NOT NULL,
    event_type        text NOT NULL,
    url               text NOT NULL,
    status            delivery_status NOT NULL DEFAULT 'pending',
    attempts          integer NOT NULL DEFAULT 0,
    last_status_code  integer,
    last_error        text,
    next_attempt_at   timestamptz,               -- due time; while sending, the sender's lease end
    enqueued_at       timestamptz DEFAULT now(), -- a deliver message is queued (NULL once taken)
    delivered_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id, created_at, id);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id  text NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    status_code  integer,
    error        text,
    duration_ms  integer,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    retry_at     timestamptz,                  -- when this failure scheduled the next attempt
    PRIMARY KEY (delivery_id, attempt)
);
"""

DROP = r"""
DROP TABLE IF EXISTS webhook_attempts, webhook_deliveries, outbox, idempotency_keys, events,
    tool_calls, checkpoints, tasks, webhook_secrets, api_keys, tenants CASCADE;
DROP TYPE IF EXISTS delivery_status;
DROP TYPE IF EXISTS task_status;
"""


def upgrade() -> None:
    op.execute(SCHEMA)


def downgrade() -> None:
    op.execute(DROP)
