"""Label checks after a retrain: every labelled image checked out of sample, wrong labels found on real photos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from core import db as core_db
from core.catalog.demo import FashionMNIST
from core.catalog.labels import set_label
from core.db import Database
from core.jobs.queue import enqueue_training, get_job
from core.jobs.worker import run_job_in_foreground
from core.ml.label_checks import label_health
from core.ml.training import run_training
from core.ml.versions import get_version
from core.schema import ImageCheck, Label
from core.views.review import LabelState, ReviewItem, ReviewOrder, review_queue
from models.training import HeadFit
from tests.core.fmnist import fashion_mnist, open_catalogue
from tests.core.training_helpers import add_job, dataset, store_images

CLASSES = ("Shoes", "Bags", "Hats")


def _noop(_: object) -> None:
    pass


def _checks(db: Database, version_id: int) -> dict[int, ImageCheck]:
    with db.read() as session:
        rows = session.scalars(select(ImageCheck).where(ImageCheck.model_version_id == version_id)).all()
        session.expunge_all()
    return {r.image_id: r for r in rows}


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_every_labelled_image_of_every_split_is_checked_after_a_retrain(db: Database, mode: str) -> None:
    ids = store_images(db, dataset(CLASSES, train=4, val=2, test=2))
    params = {"arch": "resnet18", "image_size": 32, "head_l2": 1e-3, "epochs": 1, "batch_size": 8, "patience": 0}
    version_id = run_training(db, add_job(db, mode, params), on_progress=_noop, should_stop=lambda: False)
    checks = _checks(db, version_id)
    assert set(checks) == set(ids)  # train split included
    with db.read() as session:
        labels = {i: c for i, c in session.execute(select(Label.image_id, Label.category_id))}
    for image_id, check in checks.items():
        assert check.label_category_id == labels[image_id]
        assert check.label_quality is not None and 0.0 <= check.label_quality <= 1.0
        assert check.probs is not None and len(check.probs) == 3
        assert check.suggested_category_id in set(labels.values()) and check.outlier_score is not None
    summary = get_version(db, version_id).metrics["label_check"]
    assert summary["checked"] == len(ids) and summary["folds"] == 5


def test_a_quick_retrains_label_check_reuses_the_l2_its_head_picked(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.label_checks

    store_images(db, dataset(CLASSES, train=4, val=2, test=2))
    fold_l2: list[float | None] = []
    fit = models.label_checks.fit_linear_head

    def recording(*args: Any, **kwargs: Any) -> HeadFit:
        fold_l2.append(kwargs["config"].head_l2)
        return fit(*args, **kwargs)

    monkeypatch.setattr(models.label_checks, "fit_linear_head", recording)
    params = {"arch": "resnet18", "image_size": 32}  # no fixed head_l2: the head picks one on validation
    version_id = run_training(db, add_job(db, "quick", params), on_progress=_noop, should_stop=lambda: False)
    metrics = get_version(db, version_id).metrics
    picked = metrics["train"]["head_l2"]
    # One fit per fold at the head's own L2, no grid search of the check's own (which took as long as the folds).
    assert fold_l2 == [picked] * 5
    assert metrics["label_check"]["head_l2"] == picked and metrics["label_check"]["folds"] == 5


def test_label_checks_can_be_turned_off_and_say_so(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    store_images(db, dataset(CLASSES, train=3, val=1, test=1))
    monkeypatch.setattr(db.settings, "label_check_folds", 0)
    version_id = run_training(db, add_job(db), on_progress=_noop, should_stop=lambda: False)
    assert _checks(db, version_id) == {}
    assert "off" in get_version(db, version_id).metrics["label_check"]["note"]
    assert "no label check" in label_health(db).describe()


def test_flipped_labels_among_real_product_photos_are_found_and_the_right_category_suggested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.catalog.demo import FASHION_MNIST_CLASSES, balanced_indices, make_uploads
    from core.catalog.ingest import import_uploads

    train, _ = fashion_mnist()
    db = open_catalogue(tmp_path, monkeypatch, "auto")
    chosen = balanced_indices(train.labels, 400)
    uploads, labels = make_uploads(train, chosen)
    rng = np.random.default_rng(7)
    flipped = set(rng.choice(sorted(labels), size=20, replace=False).tolist())  # 5% of the labels, uniformly
    truth = dict(labels)
    for name in flipped:
        labels[name] = FASHION_MNIST_CLASSES[(FASHION_MNIST_CLASSES.index(labels[name]) + 3) % 10]
    assert not import_uploads(db, uploads, labels=labels, actor="tester").refused
    job_id = enqueue_training(db, "quick", {}, "tester")
    assert run_job_in_foreground(db, job_id) is not None, get_job(db, job_id).error

    suspects = review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page_size=40).items
    caught = [item for item in suspects[:20] if item.original_name in flipped]
    within_40 = sum(item.original_name in flipped for item in suspects)
    print(f"flips in the first 20 suspects: {len(caught)}, in the first 40: {within_40}")
    # 64 px photos, 40 per category (measured 11-12 and 15): precision@20 >= 0.45 where picking at random gives
    # 0.05, and most flips within two pages. benchmarks/label_checks.py measures the default 224 px at 2,000 images.
    assert len(caught) >= 9 and within_40 >= 13, [(i.original_name, i.label, i.score) for i in suspects]
    right = sum(_suggested(item) == truth[item.original_name] for item in caught)
    assert right >= 0.6 * len(caught)
    assert {item.split for item in caught} & {"train"}  # the train split's wrong labels are found too
    health = label_health(db)
    # Confident learning also counts photos that are genuinely hard to tell apart at 64 px (shirt or T-shirt?).
    assert len(caught) <= health.open_issues <= 120 and health.checked == 400

    fixed = caught[0]
    set_label(db, fixed.image_id, _suggested(fixed), actor="tester")
    assert label_health(db).open_issues == health.open_issues - 1
    issues = review_queue(db, label_state=LabelState.LABEL_ISSUES, page_size=100)
    assert fixed.image_id not in [i.image_id for i in issues.items] and issues.total == health.open_issues - 1
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(ImageCheck)) == 400
    _new_uploads_unlike_anything_labelled_are_flagged(db, train)
    _similar_images_are_mostly_the_same_kind_of_product(db, truth)
    core_db.close_all()


def _suggested(item: ReviewItem) -> str:
    """The category the label check suggests for a suspect (every suspect has one)."""
    assert item.suggestion is not None, item.original_name
    return item.suggestion.category


def _similar_images_are_mostly_the_same_kind_of_product(db: Database, truth: dict[str, str]) -> None:
    from core.views.review import review_queue
    from core.views.similar import similar_images

    trousers = [
        i for i in review_queue(db, category="Trouser", page_size=50).items if truth.get(i.original_name) == "Trouser"
    ]
    alike = []
    for query in trousers[:5]:  # several photos: one odd trouser can have coats for neighbours
        near = similar_images(db, query.image_id, k=10)
        assert len(near) == 10 and query.image_id not in [n.item.image_id for n in near]
        assert [n.similarity for n in near] == sorted((n.similarity for n in near), reverse=True)
        alike.append(sum(truth.get(n.item.original_name) == "Trouser" for n in near))
    # At 64 px (chance: 5 of 50) measured 34 of the 50 nearest, 0 to 10 a photo (29 with ImageNet's 0.875 crop); at
    # the default 224 px, 72 % of the ten nearest neighbours of 2,000 Fashion-MNIST photos share their category.
    assert sum(alike) >= 20, alike


def _new_uploads_unlike_anything_labelled_are_flagged(db: Database, train: FashionMNIST) -> None:
    """A colour photo of a person among grey product shots is flagged as unlike anything labelled; another product
    shot is not. Both are scored when predicted, against the version's labelled images."""
    import io

    from PIL import Image as PILImage
    from skimage import data as samples

    from core.catalog.demo import make_uploads
    from core.catalog.ingest import Upload, import_uploads
    from core.ml.predict import predict_images
    from core.views.review import review_items

    buffer = io.BytesIO()
    PILImage.fromarray(samples.astronaut()).save(buffer, format="PNG")
    product, _ = make_uploads(train, [59_999])
    result = import_uploads(db, [Upload("astronaut.png", buffer.getvalue()), *product], actor="tester")
    ids = [item.image_id for item in result.imported]
    predict_images(db, ids)
    astronaut, shirt = review_items(db, ids)
    assert astronaut.unusual and not shirt.unusual, (astronaut.outlier_score, shirt.outlier_score)


def test_outlier_scores_of_many_labels_use_a_sample_and_never_score_an_image_against_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.ml import label_checks

    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(300, 64))).astype(np.float32)  # pooled features are non-negative
    features[7] = 0.0
    features[7, 3] = 5.0  # one image whose features point where no other image's do
    full = label_checks._labelled_outlier_scores(features, seed=0)
    monkeypatch.setattr(label_checks, "MAX_REFERENCES", 100)
    sampled = label_checks._labelled_outlier_scores(features, seed=0)
    assert int(np.argmax(full)) == int(np.argmax(sampled)) == 7
    assert np.corrcoef(full, sampled)[0, 1] > 0.8  # a sample of a third ranks like all of them
    twins = np.repeat(features[:1], 300, axis=0)  # identical images: a self-match would hide nothing here
    assert np.allclose(label_checks._labelled_outlier_scores(twins, seed=0), 0.0, atol=1e-6)
