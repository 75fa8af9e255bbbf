"""datasets.openai_check: what checking an upload by OpenAI's fine-tuning rules found

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `shared.openai_training_file.TrainingFileCheck.to_json()` of a file uploaded for the
    # OpenAI fine-tuning dialect; null for every other upload, older ones included.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("openai_check", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("openai_check")
