"""images.sku: the catalogue's stock-keeping unit for the product a photo shows, attached by the labels CSV import

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-12 09:00:00

Nullable and not unique (several photos show one product); indexed so the review search finds a SKU, exact or by
prefix, without reading the table. Existing images get NULL (no SKU).
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sku", sa.String(64), nullable=True))
        batch_op.create_index("ix_images_sku", ["sku"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_sku")
        batch_op.drop_column("sku")
