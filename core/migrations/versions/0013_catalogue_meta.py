"""meta: facts about the database itself, such as the catalogue id its data directory also records

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-10 10:00:00

The table starts empty: core.catalogue_identity gives a new catalogue its id, and an existing one adopts one, when
the database is first opened (each copy of a database made from a migrated template gets its own).
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("meta")
