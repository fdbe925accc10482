"""images.duplicate_group_id (stored near-duplicate groups) and images.duplicates_checked, with their indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00

Existing images get no group (NULL) and duplicates_checked = false: `python -m core.cli duplicates scan` fills any
missing content hashes and groups the whole catalogue once; from then on ingest keeps the groups up to date.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("duplicate_group_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("duplicates_checked", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index("ix_images_duplicate_group", "images", ["duplicate_group_id", "split"])
    op.create_index("ix_images_duplicates_checked", "images", ["duplicates_checked"])


def downgrade() -> None:
    op.drop_index("ix_images_duplicates_checked", table_name="images")
    op.drop_index("ix_images_duplicate_group", table_name="images")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("duplicates_checked")
        batch_op.drop_column("duplicate_group_id")
