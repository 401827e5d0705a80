"""The ``compensating`` task status (V2.md section 2).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Alone in its revision: PostgreSQL refuses to use a new enum value in the transaction
that added it, and revision 0005 uses it in a CHECK and an index.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TYPE task_status ADD VALUE IF NOT EXISTS 'compensating' AFTER 'input_required'"
    )


def downgrade() -> None:
    # PostgreSQL cannot drop an enum value; revision 0005's downgrade leaves no task in
    # it, so 'compensating' stays in task_status unused.
    pass
