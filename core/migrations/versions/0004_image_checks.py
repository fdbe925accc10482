"""image_checks: each model version's out-of-sample label check and outlier score per image

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 03:00:00

A new table only: existing rows are untouched. Versions trained before this revision have no checks; the next
retrain writes them.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("label_category_id", sa.Integer(), nullable=True),
        sa.Column("label_quality", sa.Float(), nullable=True),
        sa.Column("label_issue", sa.Boolean(), nullable=False),
        sa.Column("suggested_category_id", sa.Integer(), nullable=True),
        sa.Column("suggested_probability", sa.Float(), nullable=True),
        sa.Column("outlier_score", sa.Float(), nullable=True),
        sa.Column("probs", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["label_category_id"], ["categories.id"]),
        sa.ForeignKeyConstraint(["suggested_category_id"], ["categories.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "model_version_id", name="uq_image_checks_image_version"),
    )
    op.create_index("ix_image_checks_version_quality", "image_checks", ["model_version_id", "label_quality"])
    op.create_index("ix_image_checks_version_outlier", "image_checks", ["model_version_id", "outlier_score"])


def downgrade() -> None:
    op.drop_index("ix_image_checks_version_outlier", table_name="image_checks")
    op.drop_index("ix_image_checks_version_quality", table_name="image_checks")
    op.drop_table("image_checks")
