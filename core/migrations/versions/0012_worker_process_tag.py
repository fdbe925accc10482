"""workers.process: the tag of a worker's process (boot, pid namespace, pid, start time), see core.jobs.processes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-10 09:00:00

With it a process on the same machine sees at once that a worker was killed (its pid no longer runs the process that
registered) instead of waiting for the heartbeat timeout. Existing rows get "" (never judged: the timeout decides).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("process", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("process")
