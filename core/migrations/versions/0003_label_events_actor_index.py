"""label_events (actor, id) index, so undo finds an actor's latest change without reading their history

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:00:00

Undo runs while it holds the write lock; without this index it read every event of the actor (the default shared
actor can have hundreds of thousands) and blocked every other writer meanwhile. Creating the index alters no table.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.create_index("ix_label_events_actor_id", ["actor", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.drop_index("ix_label_events_actor_id")
