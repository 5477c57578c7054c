"""Job inputs: a v2 job's input images in their own table, so that the job rows that
status polls and lists read stay a few hundred bytes instead of megabytes.

Jobs stored before this keep their images in ``jobs.params``; the runner reads those as
they are.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_inputs",
        sa.Column(
            "job_id",
            sa.String(32),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("images", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_inputs")
