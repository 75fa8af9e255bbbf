"""jobs.memory_rung: the rung of the memory ladder a job trains on after running out of memory

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every job there is trains as asked: rung 0.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("memory_rung", sa.Integer(), nullable=False,
                                      server_default="0"))


def downgrade() -> None:
    # Code before this revision trains every job as asked; a job on a lower rung runs out of
    # memory again and fails as it did then.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("memory_rung")
