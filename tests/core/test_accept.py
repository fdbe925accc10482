"""Accepting confident predictions in bulk: which images, the preview, the audit rows, and undo in one step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from core import auth
from core import db as core_db
from core.catalog import labels
from core.db import Database
from core.errors import NotFound, ProdcatError
from core.schema import Label, LabelEvent
from core.settings import get_settings
from core.views.accept import accept_predictions
from tests.core.factories import FakeImage, Populated, build

pytestmark = pytest.mark.both_databases

# Classes in order Shoes, Bags, Hats.
CATALOGUE = [
    FakeImage(split="train", label=None, probs=(0.95, 0.03, 0.02)),  # 0 Shoes 95%
    FakeImage(split="val", label=None, probs=(0.05, 0.92, 0.03)),  # 1 Bags 92%
    FakeImage(split="train", label=None, probs=(0.50, 0.30, 0.20)),  # 2 unsure
    FakeImage(split="train", label="Hats", probs=(0.01, 0.02, 0.97)),  # 3 labelled already
    FakeImage(split="test", label=None, probs=None),  # 4 no prediction
    FakeImage(split="test", label=None, probs=(0.02, 0.03, 0.95)),  # 5 Hats 95%
    FakeImage(split="train", label=None, probs=(0.90, 0.06, 0.04), name="shoe-RED.jpg"),  # 6 Shoes 90%
]


@pytest.fixture
def cat(db: Database) -> Populated:
    return build(db, CATALOGUE)


def _indices(cat: Populated, ids: list[int]) -> list[int]:
    first = int(cat.image_ids[0])
    return [i - first for i in ids]


def _labels(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(Label)) or 0)


def test_the_preview_counts_per_category_and_writes_nothing(db: Database, cat: Populated) -> None:
    preview = accept_predictions(db, min_confidence=0.9, actor="ana", dry_run=True)
    assert _indices(cat, preview.image_ids) == [0, 1, 5, 6]
    assert preview.per_category == {"Shoes": 2, "Bags": 1, "Hats": 1} and preview.event_ids == []
    assert preview.describe() == "4 photos would be labelled with their predictions >= 90% (Shoes 2, Bags 1, Hats 1)"
    assert _labels(db) == 1
    assert _indices(
        cat, accept_predictions(db, min_confidence=0.9, actor="a", dry_run=True, category="Shoes").image_ids
    ) == [0, 6]
    assert _indices(
        cat, accept_predictions(db, min_confidence=0.95, actor="a", dry_run=True, split="train").image_ids
    ) == [0]
    assert _indices(
        cat, accept_predictions(db, min_confidence=0.5, actor="a", dry_run=True, search="red").image_ids
    ) == [6]


def test_accepting_labels_them_in_one_batch_that_one_undo_takes_back(db: Database, cat: Populated) -> None:
    labels.set_label(db, int(cat.image_ids[2]), "Bags", actor="ana")  # an earlier change of her own
    done = accept_predictions(db, min_confidence=0.9, actor="ana", split="train")
    assert _indices(cat, done.image_ids) == [0, 6] and done.count == 2 and not done.dry_run
    trail = labels.audit_trail(db, int(cat.image_ids[6]))
    [row] = trail
    assert (row.actor, row.action, row.new_category, row.predicted_category) == ("ana", "bulk", "Shoes", "Shoes")
    assert row.note == "accepted predictions >= 90%" and row.predicted_confidence == pytest.approx(0.9)
    [other] = labels.audit_trail(db, int(cat.image_ids[0]))
    assert row.batch_id is not None and other.batch_id == row.batch_id  # one batch
    assert _labels(db) == 4

    undone = labels.undo_last_change(db, actor="ana", only_event_ids=done.event_ids[:1])
    assert sorted(_indices(cat, [c.image_id for c in undone])) == [0, 6]
    assert _labels(db) == 2  # the batch is gone in one step; her earlier change stays
    assert [c.old_category for c in labels.undo_last_change(db, actor="ana")] == ["Bags"]


def test_archived_predictions_are_left_unlabelled_and_bad_input_is_refused(db: Database, cat: Populated) -> None:
    labels.archive_category(db, "Hats", actor="admin")
    done = accept_predictions(db, min_confidence=0.9, actor="ana")
    assert _indices(cat, done.image_ids) == [0, 1, 6] and done.skipped_archived == 1
    assert "1 predicted as an archived category left unlabelled" in done.describe()
    with pytest.raises(ProdcatError, match=r"0\.9 for 90%"):
        accept_predictions(db, min_confidence=90, actor="ana")
    with pytest.raises(ProdcatError, match="unknown split 'dev'"):
        accept_predictions(db, min_confidence=0.9, actor="ana", split="dev")


def test_without_a_model_there_is_nothing_to_accept(db: Database) -> None:
    build(db, CATALOGUE[:2], with_version=False)
    with pytest.raises(NotFound, match="no active model"):
        accept_predictions(db, min_confidence=0.9, actor="ana")


def test_cli_previews_then_accepts(db: Database, cat: Populated) -> None:
    from core.cli.app import app

    runner = CliRunner()
    preview = runner.invoke(app, ["labels", "accept-predictions", "--min-confidence", "0.9", "--dry-run"])
    assert preview.exit_code == 0, preview.output
    assert "4 photos would be labelled with their predictions >= 90% (Shoes 2, Bags 1, Hats 1)" in preview.stdout
    args = ["labels", "accept-predictions", "--min-confidence", "0.92", "--category", "Bags", "--actor", "ana"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_category"] == {"Bags": 1}
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(LabelEvent).where(LabelEvent.actor == "ana")) == 1


def test_a_viewer_may_preview_but_not_accept(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    core_db.close_all()
    db = core_db.open_database(get_settings())
    auth.add_account(db, "root", "admin", None, actor="")
    auth.add_account(db, "vic", "viewer", None, actor="root")
    auth.add_account(db, "lou", "labeller", None, actor="root")
    build(db, CATALOGUE)
    assert accept_predictions(db, min_confidence=0.9, actor="vic", dry_run=True).count == 4  # looking is allowed
    with pytest.raises(auth.PermissionDenied, match="vic is a viewer and may not label photos"):
        accept_predictions(db, min_confidence=0.9, actor="vic")
    assert _labels(db) == 1
    assert accept_predictions(db, min_confidence=0.9, actor="lou").count == 4
    assert _labels(db) == 5
