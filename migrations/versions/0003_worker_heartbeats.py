"""Workers advertise the agent versions they can take; tasks in flight per version.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

- ``worker_heartbeats``: one row per running step worker, refreshed every few seconds,
  listing the ``(agent, version)`` pairs it can run or migrate from (V2.md section 7:
  ``GET /v1/agents`` counts live workers per version, ``outlast_tasks_stranded`` counts
  tasks no live worker can take). A worker that stops cleanly deletes its row; one that
  was killed stops counting at ``live_until``.
- an index of the tasks not yet terminal by agent and version, so the per-version
  counts of tasks in flight read only those.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE worker_heartbeats (
    worker_id   text PRIMARY KEY,            -- <celery node name>/<pid>
    hostname    text NOT NULL,
    pid         integer NOT NULL,
    handles     jsonb NOT NULL,              -- [[agent, version], ...]: runs or migrates from
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    live_until  timestamptz NOT NULL         -- counted as live until then (a few heartbeats)
);
CREATE INDEX worker_heartbeats_live ON worker_heartbeats (live_until);

CREATE INDEX tasks_in_flight_version ON tasks (agent, agent_version)
    WHERE status NOT IN ('completed', 'failed', 'cancelled');
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS tasks_in_flight_version;
DROP TABLE IF EXISTS worker_heartbeats;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
