"""image_checks (model_version_id, label_issue) index: the likely-wrong-label counts read only the flagged rows

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 03:20:00

Counting a version's open label issues per category joined every checked row to its label (0.7 s at 60k labels);
with this index only the flagged rows are read. Creating an index alters no table.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_image_checks_version_issue", "image_checks", ["model_version_id", "label_issue"])


def downgrade() -> None:
    op.drop_index("ix_image_checks_version_issue", table_name="image_checks")
