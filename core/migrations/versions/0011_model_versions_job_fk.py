"""model_versions.job_id foreign key on databases that never got it (PostgreSQL)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10 09:00:00

0001 created model_versions before training_jobs, so its job_id foreign key is `use_alter`: SQLite writes it inside
the CREATE TABLE, but elsewhere it was left for an ALTER TABLE that never ran. This adds it where it is missing,
under the name PostgreSQL would have given it; SQLite databases already have it and are left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_NAME = "model_versions_job_id_fkey"


def _has_job_fk(connection: sa.Connection) -> bool:
    foreign_keys = sa.inspect(connection).get_foreign_keys("model_versions")
    return any(fk["constrained_columns"] == ["job_id"] for fk in foreign_keys)


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name != "sqlite" and not _has_job_fk(connection):
        op.create_foreign_key(_NAME, "model_versions", "training_jobs", ["job_id"], ["id"])


def downgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name != "sqlite":
        op.drop_constraint(_NAME, "model_versions", type_="foreignkey")
