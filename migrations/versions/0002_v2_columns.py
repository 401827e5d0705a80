"""V2 columns: acknowledgement and retention, key lifecycle, usage and budgets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

- ``tasks.acknowledged_at`` (V2.md section 4) with the indexes that keep "my
  unacknowledged results" and the retention purge fast at a million tasks;
- the indexes a purge or a DELETE needs to find a task's idempotency key and outbox
  rows without scanning those tables;
- ``api_keys.expires_at`` and ``last_used_at`` (V2.md section 12a);
- ``tasks.usage`` and ``tasks.budget`` (V2.md sections 1 and 3);
- ``tasks.agent_version`` (V2.md section 7);
- ``tool_calls.args_hash``: a replayed call must have been made with the same arguments
  (V2.md section 12, ``nondeterministic_replay``).

Existing databases upgrade in place: every column is nullable or has a default.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE tasks ADD COLUMN acknowledged_at timestamptz;
-- GET /v1/tasks?acknowledged=false: a tenant's terminal tasks not yet acknowledged.
CREATE INDEX tasks_tenant_unacknowledged ON tasks (tenant_id, created_at DESC, id DESC)
    WHERE acknowledged_at IS NULL AND status IN ('completed', 'failed', 'cancelled');
-- Retention: acknowledged tasks by acknowledgement time.
CREATE INDEX tasks_acknowledged ON tasks (acknowledged_at) WHERE acknowledged_at IS NOT NULL;
-- Retention of unacknowledged terminal tasks, by finishing time.
CREATE INDEX tasks_unacknowledged_finished ON tasks (finished_at)
    WHERE acknowledged_at IS NULL AND status IN ('completed', 'failed', 'cancelled');
DROP INDEX IF EXISTS tasks_finished;

-- Deleting or purging a task finds its key and its outbox rows by index.
CREATE INDEX idempotency_keys_task ON idempotency_keys (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX outbox_task ON outbox (task_id) WHERE task_id IS NOT NULL;

ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;      -- refused from then on
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;    -- written in batches, not per request
CREATE INDEX api_keys_prefix ON api_keys (key_prefix);

-- What the task really spent: counted once per completed call (never on replay).
ALTER TABLE tasks ADD COLUMN usage jsonb NOT NULL
    DEFAULT '{"model_calls": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0}';
-- As submitted, on_exhausted filled in, extensions applied; NULL: no budget.
ALTER TABLE tasks ADD COLUMN budget jsonb;

-- The agent version the task runs on (V2.md 7); existing tasks ran on version 1.
ALTER TABLE tasks ADD COLUMN agent_version text NOT NULL DEFAULT '1';

-- sha256 of the canonical JSON of the call's arguments; NULL for calls logged before 0002.
ALTER TABLE tool_calls ADD COLUMN args_hash text;

COMMENT ON TYPE task_status IS 'Mirrors app.store.lifecycle.Status; terminal states never change again.';
"""

DOWNGRADE = r"""
ALTER TABLE tool_calls DROP COLUMN IF EXISTS args_hash;
ALTER TABLE tasks DROP COLUMN IF EXISTS agent_version;
ALTER TABLE tasks DROP COLUMN IF EXISTS budget, DROP COLUMN IF EXISTS usage;
DROP INDEX IF EXISTS api_keys_prefix;
ALTER TABLE api_keys DROP COLUMN IF EXISTS last_used_at, DROP COLUMN IF EXISTS expires_at;
DROP INDEX IF EXISTS outbox_task;
DROP INDEX IF EXISTS idempotency_keys_task;
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
DROP INDEX IF EXISTS tasks_unacknowledged_finished;
DROP INDEX IF EXISTS tasks_acknowledged;
DROP INDEX IF EXISTS tasks_tenant_unacknowledged;
ALTER TABLE tasks DROP COLUMN IF EXISTS acknowledged_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
