"""the device class a job was routed to: its queue, and the workers that may claim it

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 15:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs from before device classes were all sent to the default queue, "train": they keep
    # it. The server default stays, as in the model, for rows written by tools other than
    # `shared.jobs.create_job`, which always names the class.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("device_class", sa.String(length=40), server_default="train",
                      nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("device_class")
