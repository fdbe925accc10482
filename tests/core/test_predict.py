"""Predictions: stored once per image and version, top-k views, loose files predicted without importing them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.catalog.ingest import Upload
from core.db import Database
from core.errors import NotFound
from core.ml.predict import predict_files, predict_images, predict_missing, predict_uploads, refresh_predictions
from core.ml.versions import activate_version
from core.schema import Image, Prediction
from tests.core.training_helpers import dataset, save_random_version, store_images
from tests.imagegen import image_bytes

CLASSES = ["Shoes", "Bags", "Hats"]


@pytest.fixture
def version(db: Database) -> int:
    version_id = save_random_version(db, CLASSES, seed=3)
    activate_version(db, version_id, actor="ann")
    return version_id


def _count(db: Database, version_id: int) -> int:
    with db.read() as session:
        count = session.scalar(
            select(func.count()).select_from(Prediction).where(Prediction.model_version_id == version_id)
        )
    assert count is not None
    return count


def test_predict_images_stores_each_prediction_once(db: Database, version: int) -> None:
    ids = store_images(db, dataset(CLASSES, train=2, val=0, test=0))
    views = predict_images(db, ids[:4])
    assert set(views) == set(ids[:4]) and _count(db, version) == 4
    for view in views.values():
        assert view.model_version_id == version
        assert sum(view.probs) == pytest.approx(1.0, abs=1e-4)
        assert view.confidence == pytest.approx(max(view.probs), abs=1e-5)
        assert view.category == CLASSES[int(np.argmax(view.probs))]
        assert next(t.category for t in view.top_k) == view.category
        assert [t.probability for t in view.top_k] == sorted((t.probability for t in view.top_k), reverse=True)
        assert view.margin == pytest.approx(view.top_k[0].probability - view.top_k[1].probability, abs=1e-5)
    with db.read() as session:
        first_rows = {p.image_id: p.id for p in session.scalars(select(Prediction))}
    again = predict_images(db, ids)
    assert _count(db, version) == len(ids)
    with db.read() as session:
        rows = {p.image_id: p.id for p in session.scalars(select(Prediction))}
    assert all(rows[i] == first_rows[i] for i in ids[:4])  # not recomputed
    assert again[ids[0]].probs == views[ids[0]].probs


def test_refresh_predicts_every_image(db: Database, version: int) -> None:
    ids = store_images(db, [*dataset(CLASSES[:2], train=2, val=1, test=0), (None, 9, "test")])
    done: list[tuple[int, int]] = []
    assert refresh_predictions(db, version, progress=lambda d, t: done.append((d, t))) == len(ids)
    assert _count(db, version) == len(ids)
    # Progress starts at 0 before the first chunk (a CPU takes seconds per chunk) and ends at every image.
    assert done[0] == (0, len(ids)) and done[-1] == (len(ids), len(ids))
    assert refresh_predictions(db, version) == 0


def test_predict_files_without_importing_and_bad_files_get_their_error(
    db: Database, version: int, tmp_path: Path
) -> None:
    good = tmp_path / "boot.png"
    good.write_bytes(image_bytes("Shoes", 1))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text, not a picture")
    missing = tmp_path / "gone.jpg"
    results = predict_files(db, [good, bad, missing], top_k=2)
    assert [r.name for r in results] == [str(good), str(bad), str(missing)]
    ok, refused, absent = results
    assert ok.error is None and ok.category in CLASSES and ok.confidence is not None and 0 < ok.confidence <= 1
    assert len(ok.top_k) == 2
    assert refused.category is None and refused.error
    assert absent.category is None and absent.error
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 0


def test_predict_uploads_matches_the_stored_prediction_of_the_same_picture(db: Database, version: int) -> None:
    [image_id] = store_images(db, [("Bags", 4, "train")])
    stored = predict_images(db, [image_id])[image_id]
    [upload] = predict_uploads(db, [Upload(name="bag.png", data=image_bytes("Bags", 4, size=40))], top_k=3)
    assert upload.category == stored.category
    assert upload.confidence == pytest.approx(stored.confidence, abs=1e-4)


def test_no_model_yet_is_a_clear_error(db: Database) -> None:
    with pytest.raises(NotFound, match="train"):
        predict_images(db, [1])


def test_predict_missing_fills_only_the_active_versions_gaps_one_page_at_a_time(db: Database, version: int) -> None:
    ids = store_images(db, dataset(CLASSES, train=2, val=1, test=0))  # 9 images
    predict_images(db, ids[:3])
    with db.read() as session:
        before = {p.image_id: p.id for p in session.scalars(select(Prediction))}
    assert predict_missing(db, limit=4) == 4  # a bounded page, lowest ids first
    with db.read() as session:
        assert set(session.scalars(select(Prediction.image_id))) == set(ids[:7])
    assert predict_missing(db, limit=4) == 2
    assert _count(db, version) == len(ids)
    with db.read() as session:
        after = {p.image_id: p.id for p in session.scalars(select(Prediction))}
    assert all(after[i] == before[i] for i in ids[:3])  # stored rows are never recomputed
    assert predict_missing(db, limit=4) == 0


def test_predict_missing_does_nothing_without_an_active_version(db: Database) -> None:
    save_random_version(db, CLASSES, seed=3)  # a candidate only
    store_images(db, [("Shoes", 1, "train")])
    assert predict_missing(db, limit=10) == 0
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 0


def test_after_a_merge_predictions_name_only_live_categories_and_add_up_their_probabilities(
    db: Database, version: int, tmp_path: Path
) -> None:
    from core.catalog.labels import merge_categories

    ids = store_images(db, dataset(CLASSES, train=1, val=0, test=0))
    before = predict_images(db, ids[:1])[ids[0]]
    by_name = {t.category: t.probability for t in before.top_k}
    merge_categories(db, "Hats", "Bags", actor="ann")  # the model was trained with Hats as its own class

    after = predict_images(db, ids[:1], top_k=3)[ids[0]]
    ranked = {t.category: t.probability for t in after.top_k}
    assert sorted(ranked) == ["Bags", "Shoes"]  # the archived Hats is not offered
    assert ranked["Bags"] == pytest.approx(by_name["Bags"] + by_name["Hats"])
    assert [t.probability for t in after.top_k] == sorted(ranked.values(), reverse=True)
    assert after.confidence == pytest.approx(after.top_k[0].probability)

    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes("Hats", 77))
    [loose] = predict_files(db, [photo], top_k=3)  # the CLI's `predict` path
    assert "Hats" not in [t.category for t in loose.top_k] and len(loose.top_k) == 2
    assert sum(t.probability for t in loose.top_k) == pytest.approx(1.0, abs=1e-4)
