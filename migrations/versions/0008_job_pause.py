"""jobs.pause_requested: a running job's pause, asked and not yet done by its worker

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The status column is a plain string: PAUSED needs no change to it. The server default
    # fills the rows already there; none of them has a pause asked.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    # Code before this revision knows no PAUSED status: its paused jobs go back to the queue,
    # to resume from their checkpoint, rather than be unreadable.
    op.execute("UPDATE jobs SET status = 'QUEUED' WHERE status = 'PAUSED'")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("pause_requested")
