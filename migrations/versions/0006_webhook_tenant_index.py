"""Pending webhook deliveries by tenant: the per-tenant in-flight count reads only its own.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Before claiming a send, ``app.webhooks.sender`` counts the tenant's sends in flight
(V2.md 8, ``OUTLAST_WEBHOOK_CONCURRENCY_PER_TENANT``): pending deliveries whose
``next_attempt_at`` (the send lease) is in the future. The only index on pending
deliveries was by ``next_attempt_at``, so the count read every pending delivery due
later, of every tenant: a tenant whose receiver is down for hours, with deliveries
waiting for their retries, slowed every other tenant's claims. Measured with 100,000
deliveries of one tenant awaiting retry: 3.2 ms per count of another tenant without
this index, 0.2 ms with it (and linear in the backlog without it).
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE INDEX webhook_deliveries_tenant_pending ON webhook_deliveries (tenant_id, next_attempt_at)
    WHERE status = 'pending';
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS webhook_deliveries_tenant_pending;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
