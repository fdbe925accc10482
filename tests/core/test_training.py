"""Training orchestration: the plan and its refusals, quick and full runs, head resizing, promotion, cancelling."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from core.catalog.merges import Merges
from core.db import Database
from core.errors import JobCancelled, TrainingRefused
from core.jobs.queue import TrainMode, get_job
from core.ml.contract import JobParams, ProgressReport
from core.ml.pixel_cache import CachedRows, PixelCache
from core.ml.training import _promote, run_training, training_plan
from core.ml.versions import active_version, checkpoint_path, get_version, labelled_images
from core.schema import ModelVersion, Prediction, VersionStatus
from models.checkpoint import load_checkpoint
from models.factory import PreprocessConfig, timm_api
from models.preprocess import PixelRows
from models.stages import STAGE_LAYOUTS, BlockPooling, StageLayout, StagePooledNet
from tests.core.training_helpers import add_job, dataset, save_random_version, store_images

CLASSES = ["Shoes", "Bags", "Hats"]


def _noop(_: ProgressReport) -> None:
    return None


def _never() -> bool:
    return False


def test_plan_with_no_categories_asks_for_two(db: Database) -> None:
    plan = training_plan(db)
    assert not plan.ok
    assert any("at least 2 categories" in p for p in plan.problems)
    assert plan.suggested_mode in ("quick", "full")


def test_plan_with_one_category_is_refused_naming_the_need(db: Database) -> None:
    store_images(db, dataset(["Shoes"], train=3, val=1, test=1))
    plan = training_plan(db)
    assert any("at least 2 categories" in p and "'Shoes'" in p for p in plan.problems)
    job = add_job(db)
    with pytest.raises(TrainingRefused, match="at least 2 categories"):
        run_training(db, job, on_progress=_noop, should_stop=_never)


def test_plan_leaves_sparse_categories_out_naming_what_each_needs(db: Database) -> None:
    store_images(db, dataset(["Shoes"], train=3, val=1, test=1))
    store_images(db, dataset(["Bags"], train=3, val=0, test=1))
    store_images(db, dataset(["Hats"], train=1, val=1, test=0))
    plan = training_plan(db)
    assert [c.name for c in plan.trainable] == ["Shoes"]
    assert {g.category.name: (g.train_needed, g.val_needed) for g in plan.left_out} == {"Bags": (0, 1), "Hats": (1, 0)}
    assert "'Hats' left out: label 1 more train image" in plan.notes
    assert "'Bags' left out: label 1 more validation image" in plan.notes
    # One trainable category is not a classifier: refused, naming what the left-out ones need.
    [problem] = plan.problems
    assert "at least 2 categories" in problem and "'Shoes'" in problem and "'Hats': label 1 more train image" in problem
    counts = {c.name: (c.train, c.val, c.test) for c in plan.categories}
    assert counts == {"Shoes": (3, 1, 1), "Bags": (3, 0, 1), "Hats": (1, 1, 0)}
    with pytest.raises(TrainingRefused, match="at least 2 categories"):
        run_training(db, add_job(db), on_progress=_noop, should_stop=_never)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0


def test_one_sparse_category_no_longer_blocks_a_retrain_it_is_left_out(db: Database) -> None:
    store_images(db, dataset(["Shoes", "Bags"], train=3, val=1, test=1))
    scarf = store_images(db, [("Scarves", 0, "train")])
    plan = training_plan(db)
    assert plan.ok, plan.problems
    assert [c.name for c in plan.trainable] == ["Shoes", "Bags"]
    assert "'Scarves' left out: label 1 more train image and 1 more validation image" in plan.notes
    assert plan.labelled == 11
    version_id = run_training(db, add_job(db), on_progress=_noop, should_stop=_never)
    version = get_version(db, version_id)
    assert version.class_names == ["Shoes", "Bags"]
    with db.read() as session:  # the left-out image is still predicted, as one of the model's classes
        assert session.scalar(select(Prediction.category_id).where(Prediction.image_id == scarf[0])) is not None


def test_quick_training_registers_activates_and_predicts_everything(db: Database) -> None:
    ids = store_images(db, dataset(CLASSES, train=4, val=2, test=2))
    unlabelled = store_images(db, [(None, 50, "train")])
    seen: list[ProgressReport] = []
    version_id = run_training(db, add_job(db), on_progress=seen.append, should_stop=_never)
    version = get_version(db, version_id)
    active = active_version(db)
    assert version.status == "active" and active is not None and active.id == version_id
    assert version.class_names == CLASSES and version.image_size == 32 and version.mode == "quick"
    assert version.metrics["test"]["n_images"] == 6 and version.metrics["val"]["n_images"] == 6
    assert version.test_accuracy == version.metrics["test"]["accuracy"]
    assert (db.settings.checkpoints_dir / f"v{version_id}.safetensors").is_file()
    assert (db.settings.checkpoints_dir / f"v{version_id}.json").is_file()
    assert not list(db.settings.checkpoints_dir.glob(".job*"))
    phases = {p.phase for p in seen}
    assert {"caching", "evaluating", "saving", "predicting"} <= phases
    assert all(set(p.to_json()) >= {"phase", "epoch", "loss", "val_acc", "device"} for p in seen)
    # The head fit is reported as quick mode's one epoch, then its summary.
    fit = [p for p in seen if p.phase == "fitting head"]
    assert [p.stage for p in fit] == ["head", "val", "done"] and fit[1].epoch == 1 and fit[1].val_acc is not None
    with db.read() as session:
        predicted = set(session.scalars(select(Prediction.image_id).where(Prediction.model_version_id == version_id)))
    assert predicted == set(ids + unlabelled)
    # Plan now counts corrections since this version.
    assert training_plan(db).corrections_since_active == 0


def test_second_quick_run_reuses_cached_features_and_resizes_the_head_for_a_new_category(db: Database) -> None:
    store_images(db, dataset(CLASSES[:2], train=4, val=2, test=2))
    v1 = run_training(db, add_job(db), on_progress=_noop, should_stop=_never)
    assert get_version(db, v1).class_names == CLASSES[:2]
    store_images(db, dataset(["Hats"], train=4, val=2, test=2))
    assert training_plan(db).corrections_since_active == 0  # new labels, not corrections of the model
    v2 = run_training(db, add_job(db), on_progress=_noop, should_stop=_never)
    version = get_version(db, v2)
    assert version.class_names == CLASSES and version.parent_id == v1
    assert any("head resized from 2 to 3 classes" in n for n in version.metrics["notes"])
    # Quick mode keeps the backbone, so only the 8 new images needed features.
    assert version.metrics["train"]["features_computed"] == 8


def test_a_quick_lineage_pooled_the_old_way_is_refitted_on_todays_pooling_of_the_same_backbone(db: Database) -> None:
    # A catalogue whose active model is a quick head on block means (before BlockPooling.HALVES_MIRROR_STD) gets the
    # measured pooling at its next quick retrain: same backbone, features re-pooled, a head fitted on them.
    old_layout = StageLayout((4, 5, 6, 7), BlockPooling.MEAN)
    parent = save_random_version(
        db, CLASSES, arch="efficientnet_lite0", layout=old_layout, status=VersionStatus.ACTIVE, test_accuracy=0.0
    )
    store_images(db, dataset(CLASSES, train=3, val=1, test=1))
    params = {"arch": "efficientnet_lite0", "image_size": 32}
    version = get_version(db, run_training(db, add_job(db, "quick", params), on_progress=_noop, should_stop=_never))
    assert version.parent_id == parent and version.status == "active"
    assert any(
        "features re-pooled as halves-mirror-std" in n and "mean of blocks" in n for n in version.metrics["notes"]
    )
    model, meta = load_checkpoint(checkpoint_path(db, version))
    parent_model, _ = load_checkpoint(checkpoint_path(db, get_version(db, parent)))
    assert meta.stage_layout == STAGE_LAYOUTS["efficientnet_lite0"] and isinstance(model, StagePooledNet)
    assert isinstance(parent_model, StagePooledNet)
    # The same backbone: every weight but the head's is the parent's.
    assert all(torch.equal(t, parent_model.net.state_dict()[k]) for k, t in model.net.state_dict().items())
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.weight.shape == (3, 4800) and model.classifier.weight.abs().sum() > 0


def test_full_mode_at_32_pixels_records_one_history_point_per_epoch_with_its_numbers(db: Database) -> None:
    from core.jobs.worker import JobRun

    store_images(db, dataset(CLASSES, train=4, val=1, test=1))
    seen: list[ProgressReport] = []
    job = add_job(db, "full", {"arch": "resnet18", "image_size": 32, "epochs": 2, "batch_size": 8, "patience": 0})
    run = JobRun(db, job, extra_progress=seen.append)  # the worker's own progress path, throttling included
    version_id = run_training(db, job, on_progress=run.on_progress, should_stop=run.should_stop)
    run.flush()
    version = get_version(db, version_id)
    assert version.mode == "full" and version.status == "active"
    assert version.metrics["train"]["epochs_run"] == 2
    loop = [p for p in seen if p.stage in ("train", "val", "done")]
    assert loop and all(p.phase == f"training ({p.stage})" and p.epochs == 2 for p in loop)
    assert loop[-1].stage == "done"  # the loop's summary (best epoch's val accuracy) comes last
    # The curve shows each epoch's own end-of-epoch numbers; the "done" summary never overwrites the last one.
    keys = ("epoch", "loss", "train_acc", "val_acc")
    ends = {p.epoch: {k: getattr(p, k) for k in keys} for p in loop if p.stage == "val"}
    assert get_job(db, job).history == [ends[1], ends[2]]


def test_quick_mode_records_its_head_fit_as_one_history_point(db: Database) -> None:
    from core.jobs.worker import JobRun

    store_images(db, dataset(CLASSES, train=4, val=1, test=1))
    job = add_job(db)
    run = JobRun(db, job)  # the worker's own progress path, throttling included
    version_id = run_training(db, job, on_progress=run.on_progress, should_stop=run.should_stop)
    run.flush()
    train_accuracy = get_version(db, version_id).metrics["train"]["accuracy"]
    [point] = get_job(db, job).history
    assert point["epoch"] == 1 and point["loss"] is None and point["val_acc"] is not None
    assert point["train_acc"] == pytest.approx(train_accuracy)


def test_cancel_leaves_no_version_and_no_checkpoint(db: Database) -> None:
    store_images(db, dataset(CLASSES, train=3, val=1, test=1))
    calls = {"n": 0}

    def stop_after_a_while() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(JobCancelled):
        run_training(db, add_job(db), on_progress=_noop, should_stop=stop_after_a_while)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0
    leftovers = list(db.settings.checkpoints_dir.glob("*")) if db.settings.checkpoints_dir.exists() else []
    assert leftovers == []


def test_bad_parameter_is_refused_by_name(db: Database) -> None:
    store_images(db, dataset(CLASSES[:2], train=2, val=1, test=0))
    with pytest.raises(TrainingRefused, match="bogus"):
        run_training(db, add_job(db, "quick", {"bogus": 1}), on_progress=_noop, should_stop=_never)


def test_worse_candidate_stays_candidate_and_better_or_equal_is_promoted(db: Database) -> None:
    store_images(db, dataset(CLASSES, train=1, val=0, test=2))
    active = save_random_version(db, CLASSES, seed=1)
    from core.ml.versions import activate_version, evaluate_version

    activate_version(db, active, actor="ann")
    measured = evaluate_version(db, active)
    candidate = save_random_version(db, CLASSES, seed=2)
    # The active version's stored hash differs from the current test set: it is re-measured on the same images.
    worse = measured["accuracy"] - 0.01
    pairs = labelled_images(db, "test")
    assert (
        _promote(db, candidate, job_id=0, test_accuracy=worse, test_hash=measured["test_set_hash"], test_pairs=pairs)
        is False
    )
    assert get_version(db, candidate).status == "candidate"
    serving = active_version(db)
    assert serving is not None and serving.id == active
    promotion = get_version(db, candidate).metrics["promotion"]
    assert promotion["active_accuracy_same_images"] == pytest.approx(measured["accuracy"])
    equal = measured["accuracy"]
    assert (
        _promote(db, candidate, job_id=0, test_accuracy=equal, test_hash=measured["test_set_hash"], test_pairs=pairs)
        is True
    )
    serving = active_version(db)
    assert serving is not None and serving.id == candidate


def test_labels_corrected_while_a_job_runs_do_not_tilt_the_promotion(db: Database) -> None:
    from core.catalog.labels import set_label
    from core.ml.versions import activate_version, evaluate_version, hash_test_set

    store_images(db, dataset(CLASSES, train=1, val=0, test=4))
    active = save_random_version(db, CLASSES, seed=1)
    activate_version(db, active, actor="ann")
    candidate = save_random_version(db, CLASSES, seed=2)
    seen_by_candidate = labelled_images(db, "test")  # the candidate was measured on these labels
    on_same_labels = evaluate_version(db, active, pairs=seen_by_candidate)["accuracy"]
    # Meanwhile someone relabels every test image to what the active model predicts for it: on the new labels the
    # active model would score 100% and a fair candidate would look worse.
    from core.ml.predict import predict_images

    for image_id, _ in seen_by_candidate:
        set_label(db, image_id, predict_images(db, [image_id], version_id=active)[image_id].category, actor="bo")
    assert evaluate_version(db, active)["accuracy"] == 1.0 != on_same_labels

    promoted = _promote(
        db,
        candidate,
        job_id=0,
        test_accuracy=on_same_labels,  # as good as the active version on the images and labels it was measured on
        test_hash=hash_test_set(seen_by_candidate),
        test_pairs=seen_by_candidate,
    )
    promotion = get_version(db, candidate).metrics["promotion"]
    assert promotion["active_accuracy_same_images"] == pytest.approx(on_same_labels)
    serving = active_version(db)
    assert promoted is True and serving is not None and serving.id == candidate


def test_manual_policy_never_activates(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db.settings, "promote_policy", "manual")
    candidate = save_random_version(db, CLASSES, seed=1)
    assert _promote(db, candidate, job_id=0, test_accuracy=1.0, test_hash="", test_pairs=[]) is False
    assert active_version(db) is None
    assert "manual" in get_version(db, candidate).metrics["promotion"]["reason"]


def test_cli_train_wait_runs_the_job_here_and_reports_refusals(db: Database) -> None:
    from typer.testing import CliRunner

    from core.cli.app import app
    from core.jobs.queue import list_jobs

    runner = CliRunner()
    refused = runner.invoke(app, ["train", "--wait"])
    assert refused.exit_code == 1 and "at least 2 categories" in refused.output
    store_images(db, dataset(CLASSES[:2], train=3, val=1, test=1))
    store_images(db, [("Scarves", 0, "val")])
    result = runner.invoke(app, ["train", "--wait", "--mode", "quick", "--image-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "note: 'Scarves' left out: label 2 more train images" in result.output
    [job] = list_jobs(db, 5)
    active = active_version(db)
    assert job.status == "succeeded" and active is not None and job.model_version_id == active.id
    assert f"model v{job.model_version_id}" in result.output


def _cache_in_reverse(db: Database, ids: list[int]) -> None:
    """Cache these images' pixels (resnet18 at 32 px) in reverse order, as uploads and prediction refreshes leave a
    cache: the rows of each split are then not contiguous in the file, so an eager gather would copy them all."""
    from models.factory import create_network, preprocessing_config

    model, _ = create_network("resnet18", len(CLASSES), pretrained="none")
    PixelCache.for_config(db.settings, preprocessing_config(model, 32)).fill(db, ids[::-1])


def _assert_lazy_rows_of(db: Database, pixels: object, cfg: object, ids: list[int]) -> None:
    """`pixels` is a lazy view over the cache file (not an in-memory copy) showing exactly these images' pixels."""
    assert isinstance(pixels, CachedRows) and isinstance(pixels.mapped, np.memmap)
    assert len(pixels) == len(ids) and np.any(np.diff(pixels.positions) != 1)
    eager = PixelCache.for_config(db.settings, cfg).ensure(db, ids)
    batch = np.array([len(ids) - 1, 0, 1])
    assert np.array_equal(pixels[batch], eager[batch])
    assert np.array_equal(np.asarray(pixels), eager)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_training_reads_a_non_contiguous_pixel_cache_through_lazy_views(
    db: Database, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import models.training

    ids = store_images(db, dataset(CLASSES, train=3, val=1, test=1))
    _cache_in_reverse(db, ids)
    seen: list[tuple[object, object]] = []  # (pixels, preprocessing config) the models library was given
    if mode == "quick":
        real_features = models.training.extract_features

        def features_spy(model: torch.nn.Module, pixels: PixelRows, cfg: PreprocessConfig, **kwargs: Any) -> np.ndarray:
            seen.append((pixels, cfg))
            return real_features(model, pixels, cfg, **kwargs)

        monkeypatch.setattr(models.training, "extract_features", features_spy)
    else:
        real_train = models.training.train_full

        def train_spy(
            config: models.training.TrainConfig, data: models.training.TrainData, **kwargs: Any
        ) -> models.training.TrainResult:
            seen.extend([(data.train_pixels, kwargs["cfg"]), (data.val_pixels, kwargs["cfg"])])
            return real_train(config, data, **kwargs)

        monkeypatch.setattr(models.training, "train_full", train_spy)
    params = {"arch": "resnet18", "image_size": 32, "head_l2": 1e-3, "epochs": 1, "batch_size": 4, "patience": 0}
    run_training(db, add_job(db, mode, params), on_progress=_noop, should_stop=_never)
    splits = ["train", "val", "test"] if mode == "quick" else ["train", "val"]
    assert len(seen) == len(splits)
    for (pixels, cfg), split in zip(seen, splits, strict=True):
        _assert_lazy_rows_of(db, pixels, cfg, [i for i, _ in labelled_images(db, split)])


def test_evaluation_reads_a_non_contiguous_test_split_through_a_lazy_view(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.ml.versions import evaluate_version
    from models.inference import Classifier

    ids = store_images(db, dataset(CLASSES, train=0, val=0, test=3))
    _cache_in_reverse(db, ids)
    version = save_random_version(db, CLASSES)
    real_predict = Classifier.predict_pixels
    seen: list[tuple[object, object]] = []

    def predict_spy(self: Classifier, pixels: PixelRows | torch.Tensor, **kwargs: Any) -> np.ndarray:
        seen.append((pixels, self.cfg))
        return real_predict(self, pixels, **kwargs)

    monkeypatch.setattr(Classifier, "predict_pixels", predict_spy)
    assert evaluate_version(db, version)["n_images"] == 9
    [(pixels, cfg)] = seen
    _assert_lazy_rows_of(db, pixels, cfg, [i for i, _ in labelled_images(db, "test")])


def test_a_class_merged_since_the_parent_keeps_its_learned_row_under_the_category_it_went_into(db: Database) -> None:
    import torch

    from core.catalog.labels import add_category, merge_categories
    from core.ml.backbone import plan_lineage
    from core.ml.training import _head_row_names, _starting_network, build_train_config
    from core.ml.versions import checkpoint_path, get_version
    from models.checkpoint import load_checkpoint

    parent_id = save_random_version(db, ["Shoes", "Sneakers", "Hats"], seed=4)
    parent = get_version(db, parent_id)
    shoes, sneakers, hats = parent.class_category_ids
    boots = add_category(db, "Boots", actor="ann").id
    merge_categories(db, "Sneakers", "Boots", actor="ann")  # Boots is new to the model: it inherits Sneakers' row
    assert _head_row_names([shoes, sneakers, hats], Merges({sneakers: boots})) == [str(shoes), str(boots), str(hats)]
    # Merged into a category the model already has a row for: that row stays the category's own.
    assert _head_row_names([shoes, sneakers], Merges({sneakers: shoes})) == [str(shoes), f"merged:{sneakers}"]

    config = build_train_config(db.settings, JobParams(TrainMode.QUICK, {"image_size": 32}))
    lineage = plan_lineage(db.settings, parent=parent, image_size=32)
    assert lineage.continue_from == parent_id  # random weights everywhere (tests): the active version is continued
    model, _, notes, used = _starting_network(db, config, lineage, [shoes, hats, boots], active_id=parent_id)
    old, _ = load_checkpoint(checkpoint_path(db, parent), device="cpu")
    new_head, old_head = timm_api(model).get_classifier(), timm_api(old).get_classifier()
    assert isinstance(new_head, torch.nn.Linear) and isinstance(old_head, torch.nn.Linear)
    new_w, old_w = new_head.weight, old_head.weight
    assert used == parent_id and any("head resized" in n for n in notes)
    torch.testing.assert_close(new_w[2], old_w[1])  # Boots = what Sneakers learned
    torch.testing.assert_close(new_w[0], old_w[0])  # Shoes
    torch.testing.assert_close(new_w[1], old_w[2])  # Hats
