"""Compensation and child tasks: the ``compensating`` status, undo calls, parents.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

- ``task_status`` gained ``compensating`` (V2.md section 2) in revision 0004: PostgreSQL
  refuses a new enum value inside the transaction that added it, and each revision runs
  in a transaction of its own.
- ``tasks.compensation`` (V2.md section 5): ``{"reason", "total", "done", "failed"}``,
  set on entry to ``compensating`` and kept on the terminal task. A task that is
  compensating a failure already carries the failure's ``error``, so the CHECK that
  ties ``error`` to ``failed`` now also admits ``compensating`` with reason ``failed``.
- ``tool_calls.kind``: ``call`` or ``compensation``. An undo is logged at the index of
  the call it undoes, so ``kind`` joins the primary key.
- ``tool_calls.compensate``: the tool that undoes this call, as the tool declared it when
  the call was made (NULL: nothing to undo). What is owed is then a fact of the log,
  whatever a later deploy of the agent declares.
- ``tasks.parent_id`` and ``tasks.spawn_key`` (V2.md section 6): a child knows its parent
  and the parent's spawn call (``<step>:<index>``) that created it, unique per parent,
  so a re-run of the step finds the same child instead of making a second one.
- ``tasks.waiting_for``: ``{"ids": [...], "mode": "all" | "any"}`` while a parent's next
  step waits for its children. Such a task holds no lease and no timer, and the
  lost-message sweep must not send it a step: its index now says so.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- Compensation (V2.md 5).
ALTER TABLE tasks ADD COLUMN compensation jsonb;
ALTER TABLE tasks DROP CONSTRAINT tasks_error_iff_failed;
ALTER TABLE tasks ADD CONSTRAINT tasks_error_iff_failed CHECK (
    (error IS NOT NULL) = (status = 'failed'
                           OR (status = 'compensating' AND compensation->>'reason' = 'failed'))
);
ALTER TABLE tasks ADD CONSTRAINT tasks_compensating_has_compensation
    CHECK (status <> 'compensating' OR compensation IS NOT NULL);

ALTER TABLE tool_calls ADD COLUMN kind text NOT NULL DEFAULT 'call'
    CHECK (kind IN ('call', 'compensation'));
ALTER TABLE tool_calls DROP CONSTRAINT tool_calls_pkey;
ALTER TABLE tool_calls ADD PRIMARY KEY (task_id, step_index, call_index, kind);
ALTER TABLE tool_calls ADD COLUMN compensate text;

-- Child tasks (V2.md 6). Deleting a parent keeps its children, without a parent.
ALTER TABLE tasks ADD COLUMN parent_id text REFERENCES tasks (id) ON DELETE SET NULL;
ALTER TABLE tasks ADD COLUMN spawn_key text;
ALTER TABLE tasks ADD CONSTRAINT tasks_spawn_key_iff_parent
    CHECK ((spawn_key IS NULL) OR (parent_id IS NOT NULL));
CREATE UNIQUE INDEX tasks_parent_spawn ON tasks (parent_id, spawn_key)
    WHERE parent_id IS NOT NULL;
-- GET /v1/tasks/{id}/children, in the order they were spawned.
CREATE INDEX tasks_parent_created ON tasks (parent_id, created_at, id)
    WHERE parent_id IS NOT NULL;

ALTER TABLE tasks ADD COLUMN waiting_for jsonb;
-- The wake-up backstop sweep: parents waiting for children.
CREATE INDEX tasks_waiting ON tasks (updated_at) WHERE waiting_for IS NOT NULL;
-- Lost-message sweep: queued steps nobody picked up (a waiting parent has none queued).
DROP INDEX IF EXISTS tasks_dispatched;
CREATE INDEX tasks_dispatched ON tasks (dispatched_at)
    WHERE lease_token IS NULL AND wake_at IS NULL AND waiting_for IS NULL
      AND status IN ('pending', 'working', 'compensating');

COMMENT ON TYPE task_status IS 'Mirrors app.store.lifecycle.Status; terminal states never change again.';
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS tasks_dispatched;
CREATE INDEX tasks_dispatched ON tasks (dispatched_at)
    WHERE lease_token IS NULL AND wake_at IS NULL AND status IN ('pending', 'working');
DROP INDEX IF EXISTS tasks_waiting;
ALTER TABLE tasks DROP COLUMN IF EXISTS waiting_for;
DROP INDEX IF EXISTS tasks_parent_created;
DROP INDEX IF EXISTS tasks_parent_spawn;
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_spawn_key_iff_parent;
ALTER TABLE tasks DROP COLUMN IF EXISTS spawn_key, DROP COLUMN IF EXISTS parent_id;

DELETE FROM tool_calls WHERE kind = 'compensation';
ALTER TABLE tool_calls DROP CONSTRAINT tool_calls_pkey;
ALTER TABLE tool_calls ADD PRIMARY KEY (task_id, step_index, call_index);
ALTER TABLE tool_calls DROP COLUMN IF EXISTS kind, DROP COLUMN IF EXISTS compensate;

-- A task still compensating cannot be represented without the status: it ends as it was
-- headed (a failure keeps its error; a cancel is cancelled).
UPDATE tasks SET status = CASE WHEN compensation->>'reason' = 'failed'
                               THEN 'failed'::task_status ELSE 'cancelled'::task_status END,
                 finished_at = COALESCE(finished_at, now()),
                 lease_token = NULL, lease_expires_at = NULL, wake_at = NULL
    WHERE status = 'compensating';
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_compensating_has_compensation;
ALTER TABLE tasks DROP CONSTRAINT tasks_error_iff_failed;
ALTER TABLE tasks ADD CONSTRAINT tasks_error_iff_failed
    CHECK ((status = 'failed') = (error IS NOT NULL));
ALTER TABLE tasks DROP COLUMN IF EXISTS compensation;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
