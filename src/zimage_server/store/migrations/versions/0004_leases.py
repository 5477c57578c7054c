"""Leases: which API process runs a job or sends a webhook, and until when.

A replica claims a row by writing its id and a lease end; it renews the lease while it
works (heartbeats). A row whose lease has run out belongs to nobody, and any live replica
may claim it: that is how the jobs and webhooks of a replica that died are taken over.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "webhook_deliveries"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
            batch.add_column(sa.Column("lease_until", sa.Float(), nullable=True))
        op.create_index(f"ix_{table}_lease_until", table, ["lease_until"])


def downgrade() -> None:
    for table in ("jobs", "webhook_deliveries"):
        op.drop_index(f"ix_{table}_lease_until", table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_until")
            batch.drop_column("claimed_by")
