"""images.phash: perceptual hash, so near-duplicates share a split

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:30:00

Images imported before this revision keep a NULL hash: their split is already fixed and never changes, and a new
near-duplicate of one of them falls back to its own content hash's split.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("phash", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_images_phash", ["phash"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_phash")
        batch_op.drop_column("phash")
