"""label_events.undoes_event_id and batch_id: the audit trail's meaning in columns instead of note text

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 09:00:00

Until now undo found what it had taken back through notes reading `undo of event #<id> (<action>)`, and a bulk
change's events were told apart by a `(batch <hex>)` tag in their note and an equal timestamp. Existing rows are
converted from those notes:

- an undo event whose note names an earlier event of the same image gets undoes_event_id = that event;
- a bulk event gets batch_id = its note's tag (untagged ones: one id per actor, time and note, the old rule);
- the events one rename, merge or category delete wrote (same action, actor, time and note) share a new batch id,
  and so do the undo events that took one bulk batch back (same actor and time).

The notes stay as they are (they are for people). `action` keeps its VARCHAR(32); the ORM now reads it as
core.schema.LabelAction. Plain SQL and Python only, so it runs on SQLite and PostgreSQL alike.
"""

import re
import uuid
from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_UNDO_NOTE = re.compile(r"^undo of event #(\d+) \(([a-z-]+)\)")
_BATCH_TAG = re.compile(r"\(batch ([0-9a-f]{6,32})\)\s*$")
_GROUPED = ("rename", "merge", "delete-category")
_CHUNK = 900  # ids per IN (...): under SQLite's smallest bound-parameter limit

_events = sa.table(
    "label_events",
    sa.column("id", sa.Integer),
    sa.column("image_id", sa.Integer),
    sa.column("action", sa.String),
    sa.column("actor", sa.String),
    sa.column("created_at", sa.DateTime),
    sa.column("note", sa.Text),
    sa.column("undoes_event_id", sa.Integer),
    sa.column("batch_id", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("undoes_event_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("batch_id", sa.String(32), nullable=True))
        batch_op.create_foreign_key("fk_label_events_undoes_event_id", "label_events", ["undoes_event_id"], ["id"])
    connection = op.get_bind()
    _link_undos(connection)
    _name_batches(connection)
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.create_index("ix_label_events_undoes_event_id", ["undoes_event_id"], unique=False)
        batch_op.create_index("ix_label_events_batch_id", ["batch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.drop_index("ix_label_events_batch_id")
        batch_op.drop_index("ix_label_events_undoes_event_id")
        batch_op.drop_constraint("fk_label_events_undoes_event_id", type_="foreignkey")
        batch_op.drop_column("batch_id")
        batch_op.drop_column("undoes_event_id")


def _link_undos(connection: sa.Connection) -> None:
    """undoes_event_id from `undo of event #<id> (...)`, where that id is an earlier event of the same image."""
    undos = connection.execute(
        sa.select(_events.c.id, _events.c.image_id, _events.c.note).where(_events.c.action == "undo")
    ).all()
    named = {}
    for event_id, image_id, note in undos:
        found = _UNDO_NOTE.match(note or "")
        if found and int(found.group(1)) < event_id:
            named[event_id] = (int(found.group(1)), image_id)
    targets = sorted({target for target, _ in named.values()})
    image_of = {}
    for start in range(0, len(targets), _CHUNK):
        chunk = targets[start : start + _CHUNK]
        found = connection.execute(sa.select(_events.c.id, _events.c.image_id).where(_events.c.id.in_(chunk)))
        image_of.update(found.all())
    rows = [
        {"b_id": event_id, "b_undoes": target}
        for event_id, (target, image_id) in named.items()
        if image_of.get(target) == image_id
    ]
    _update(connection, rows, undoes_event_id=sa.bindparam("b_undoes"))


def _name_batches(connection: sa.Connection) -> None:
    """batch_id for the events that were written together as one change (see the module docstring)."""
    rows = connection.execute(
        sa.select(_events.c.id, _events.c.action, _events.c.actor, _events.c.created_at, _events.c.note)
        .where(_events.c.action.in_(("bulk", "undo", *_GROUPED)))
        .order_by(_events.c.id)
    ).all()
    groups = defaultdict(list)
    for event_id, action, actor, created_at, note in rows:
        note = note or ""
        if action == "bulk":
            tag = _BATCH_TAG.search(note)
            key = ("tag", tag.group(1)) if tag else ("bulk", actor, created_at, note)
        elif action == "undo":
            undone = _UNDO_NOTE.match(note)
            if not undone or undone.group(2) != "bulk":
                continue
            key = ("undo", actor, created_at)
        else:
            key = (action, actor, created_at, note)
        groups[key].append(event_id)
    updates = []
    for key, ids in groups.items():
        batch_id = key[1] if key[0] == "tag" else uuid.uuid4().hex
        updates += [{"b_id": event_id, "b_batch": batch_id} for event_id in ids]
    _update(connection, updates, batch_id=sa.bindparam("b_batch"))


def _update(connection: sa.Connection, rows: list, **values: sa.BindParameter) -> None:
    if rows:
        connection.execute(sa.update(_events).where(_events.c.id == sa.bindparam("b_id")).values(**values), rows)
