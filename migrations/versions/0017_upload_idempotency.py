"""idempotency keys for dataset uploads: a record answers for a job or a dataset

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=36), nullable=True)
        batch_op.add_column(sa.Column("dataset_id", sa.String(length=36), nullable=True))
        batch_op.create_foreign_key("fk_idempotency_keys_dataset_id_datasets", "datasets",
                                    ["dataset_id"], ["id"], ondelete="CASCADE")
        batch_op.create_index(batch_op.f("ix_idempotency_keys_dataset_id"), ["dataset_id"],
                              unique=False)


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE job_id IS NULL")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_dataset_id"))
        batch_op.drop_constraint("fk_idempotency_keys_dataset_id_datasets", type_="foreignkey")
        batch_op.drop_column("dataset_id")
        batch_op.alter_column("job_id", existing_type=sa.String(length=36), nullable=False)
