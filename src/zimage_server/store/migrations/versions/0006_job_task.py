"""Job task: a v2 job's task (text-to-image, img2img, inpaint, controlnet) in its own
column, so that a process claims only the jobs it can render (one without ControlNet
weights leaves ControlNet jobs to one that has them). Until now the task lived only in
``jobs.params``: existing rows are filled in from there (text-to-image when it has none).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DEFAULT = "text-to-image"
# The params' "task", read by each database's own JSON functions.
FROM_PARAMS = {
    "sqlite": "json_extract(params, '$.task')",
    "postgresql": "CAST(params AS json) ->> 'task'",
}


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("task", sa.String(32), nullable=False, server_default=DEFAULT))
    task = FROM_PARAMS[op.get_bind().dialect.name]
    op.execute(f"UPDATE jobs SET task = COALESCE({task}, '{DEFAULT}')")  # noqa: S608


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("task")
