"""an index on jobs (tenant_id, status), for the active-jobs count of every submit

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 02:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Without it the count walks every tenant's queued and running jobs (status first in
    # ix_jobs_status_lease), or all of this tenant's jobs, while the tenant is locked.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_status", ["tenant_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_status")
