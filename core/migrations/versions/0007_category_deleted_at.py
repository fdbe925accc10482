"""categories.deleted_at: a deleted category that the audit trail or a model version still names

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:00:00

A category nothing refers to is deleted outright; one that label events, predictions or model versions still name
keeps its row (so old audit rows read right), archived, renamed `<name> (deleted #<id>)` so the name is free
again, with deleted_at set. Existing categories are not deleted (NULL).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("categories", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("categories", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
