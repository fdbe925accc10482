"""Retraining from pretrained weights: better than random init on real product photos, recorded, refused safely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core import db as core_db
from core.catalog.demo import FashionMNIST
from core.db import Database
from core.jobs.queue import enqueue_training, get_job
from core.jobs.worker import run_job_in_foreground
from core.ml.versions import active_version, checkpoint_path, get_version
from core.schema import JobStatus
from core.settings import get_settings
from models.checkpoint import read_meta
from tests.core.fmnist import fashion_mnist as _fashion_mnist
from tests.core.fmnist import open_catalogue as _open
from tests.core.training_helpers import save_random_version

PER_CLASS = 24  # 240 labelled Fashion-MNIST photos, the app's own 80/10/10 split
TEST_PER_CLASS = 30  # 300 official test photos, never imported


def _retrain_and_score(
    db: Database, train: FashionMNIST, official_test: Path, test_labels: np.ndarray
) -> tuple[float, str]:
    """Import the labelled photos, run a quick retrain the way the worker does, classify the official test files."""
    from core.catalog.demo import FASHION_MNIST_CLASSES, balanced_indices, make_uploads
    from core.catalog.ingest import import_uploads
    from core.ml.predict import predict_files

    uploads, labels = make_uploads(train, balanced_indices(train.labels, PER_CLASS * 10))
    assert not import_uploads(db, uploads, labels=labels, actor="tester").refused
    job_id = enqueue_training(db, "quick", {}, "tester")
    version_id = run_job_in_foreground(db, job_id)
    assert version_id is not None, get_job(db, job_id).error
    results = predict_files(db, sorted(official_test.iterdir()))
    guessed = [FASHION_MNIST_CLASSES.index(r.top_k[0].category) for r in results]
    version = active_version(db)
    assert version is not None
    return float(np.mean(np.array(guessed) == test_labels)), version.pretrained_source


def test_a_first_retrain_from_the_bundled_backbone_beats_random_init_and_says_where_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.catalog.demo import balanced_indices, encode_png, file_name

    train, test = _fashion_mnist()
    official = tmp_path / "official-test"
    official.mkdir()
    chosen = balanced_indices(test.labels, TEST_PER_CLASS * 10)
    for index in chosen:
        (official / file_name("test", int(index))).write_bytes(encode_png(test.images[index]))
    truth = np.array([test.labels[i] for i in sorted(chosen, key=lambda i: file_name("test", int(i)))])

    random_acc, random_source = _retrain_and_score(
        _open(tmp_path / "random", monkeypatch, "none"), train, official, truth
    )
    db = _open(tmp_path / "pretrained", monkeypatch, "auto")
    pretrained_acc, source = _retrain_and_score(db, train, official, truth)

    assert random_source == "none" and source == "bundled:efficientnet_lite0"
    assert pretrained_acc >= random_acc + 0.08, (pretrained_acc, random_acc)
    assert pretrained_acc >= 0.6  # 24 labels per category: a useful first model, not a coin toss
    version = active_version(db)
    assert version is not None and version.arch == "efficientnet_lite0"  # the architecture followed the weights
    meta = read_meta(checkpoint_path(db, version))  # the sidecar says where the weights came from
    assert meta.pretrained_source == "bundled:efficientnet_lite0" and meta.arch == "efficientnet_lite0"
    assert meta.feature_blocks == [4, 5, 6, 7]  # the quick head reads inner blocks too (models/stages.py)
    # The next retrain continues the lineage from that checkpoint (a stage-pooled network loaded back) and serves.
    job_id = enqueue_training(db, "quick", {}, "tester")
    again = run_job_in_foreground(db, job_id)
    assert again is not None, get_job(db, job_id).error
    child = get_version(db, again)
    assert child.parent_id == version.id  # continued from it, not a fresh network
    assert read_meta(checkpoint_path(db, child)).feature_blocks == [4, 5, 6, 7]
    core_db.close_all()


def test_a_refused_weights_file_fails_the_job_clearly_and_the_active_model_keeps_serving(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.schema import VersionStatus
    from tests.core.training_helpers import dataset, store_images

    active_id = save_random_version(db, ["Shoes", "Hats"], seed=1, status=VersionStatus.ACTIVE)
    store_images(db, dataset(("Shoes", "Hats")))
    broken = tmp_path / "shop-backbone.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    monkeypatch.setenv("PRODCAT_PRETRAINED_FILE", str(broken))
    monkeypatch.setenv("PRODCAT_PRETRAINED", "auto")
    core_db.close_all()
    get_settings.cache_clear()
    db = core_db.open_database(get_settings())

    job_id = enqueue_training(db, "quick", {"image_size": 32}, "tester")
    assert run_job_in_foreground(db, job_id) is None
    job = get_job(db, job_id)
    assert job.status == JobStatus.FAILED
    assert "shop-backbone.safetensors" in job.error and "not a readable safetensors" in job.error
    assert "Traceback" not in job.error.splitlines()[0]
    serving = active_version(db)
    assert serving is not None and serving.id == active_id
