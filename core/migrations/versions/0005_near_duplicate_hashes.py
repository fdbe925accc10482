"""images.box_dhash_h/box_dhash_v/box_phash (near-duplicates by Hamming distance) and the image_events audit table

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:00:00

Images imported before this revision keep NULL hashes and their split: `python -m core.cli duplicates scan` fills
the hashes from the stored originals and reports groups, never moving an image to another split.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("box_dhash_h", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("box_dhash_v", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("box_phash", sa.BigInteger(), nullable=True))
    op.create_table(
        "image_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("original_name", sa.String(length=500), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_image_events_image_id", "image_events", ["image_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_image_events_image_id", table_name="image_events")
    op.drop_table("image_events")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("box_phash")
        batch_op.drop_column("box_dhash_v")
        batch_op.drop_column("box_dhash_h")
