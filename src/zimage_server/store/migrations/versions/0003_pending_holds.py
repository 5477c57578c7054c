"""Pending holds: credits held for requests still running, settled exactly once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_holds",
        sa.Column("reference", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_pending_holds_key_id", "pending_holds", ["key_id"])
    op.create_index("ix_pending_holds_expires_at", "pending_holds", ["expires_at"])
    # Jobs still unfinished hold their price: make those holds pending, so the job's
    # terminal transaction settles them. (Older request holds were settled when taken.)
    op.execute(
        sa.text(
            "INSERT INTO pending_holds (reference, key_id, amount, created_at, expires_at) "
            "SELECT id, key_id, price, :now, NULL FROM jobs "
            "WHERE key_id IS NOT NULL AND status IN ('QUEUED', 'PROCESSING')"
        ).bindparams(now=time.time())
    )


def downgrade() -> None:
    op.drop_table("pending_holds")
