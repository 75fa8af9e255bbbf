"""a role per API key: member (its tenant only) or admin (every tenant, for operators)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Keys that exist before this revision become members: nobody is an admin by accident.
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), server_default="member", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("role")
