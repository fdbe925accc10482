"""Model versions: activation and rollback, refusal of corrupt or pickled checkpoints, cached loading, evaluation."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
import torch

from core.db import Database
from core.errors import CheckpointError, NotFound
from core.ml.versions import (
    activate_version,
    active_version,
    checkpoint_files,
    checkpoint_path,
    evaluate_version,
    get_version,
    list_versions,
    load_classifier,
    model_archive_bytes,
)
from tests.core.training_helpers import dataset, save_random_version, store_images

CLASSES = ["Shoes", "Bags", "Hats"]


@pytest.mark.both_databases
def test_activate_retires_the_previous_and_rollback_restores_it(db: Database) -> None:
    assert active_version(db) is None
    v1 = save_random_version(db, CLASSES, seed=1)
    v2 = save_random_version(db, CLASSES, seed=2)
    activate_version(db, v1, actor="ann")
    active = active_version(db)
    assert active is not None and active.id == v1
    activate_version(db, v2, actor="ann")
    active = active_version(db)
    assert active is not None and active.id == v2
    assert get_version(db, v1).status == "retired"
    # Rollback: activating the older version again.
    activate_version(db, v1, actor="ann")
    statuses = {v.id: v.status for v in list_versions(db)}
    assert statuses == {v1: "active", v2: "retired"}
    assert [v.id for v in list_versions(db)] == [v2, v1]  # newest first


@pytest.mark.parametrize("damage", ["garbage", "pickle", "missing", "truncated"])
def test_broken_checkpoint_is_refused_and_the_active_version_keeps_serving(db: Database, damage: str) -> None:
    good = save_random_version(db, CLASSES, seed=1)
    activate_version(db, good, actor="ann")
    bad = save_random_version(db, CLASSES, seed=2)
    path = checkpoint_path(db, get_version(db, bad))
    if damage == "garbage":
        path.write_bytes(b"this is not a safetensors file at all")
    elif damage == "pickle":
        # A PyTorch pickle renamed to .safetensors: must be refused, never unpickled.
        os.remove(path)
        torch.save({"weight": torch.zeros(3)}, path)
    elif damage == "missing":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"v{bad}"):
        activate_version(db, bad, actor="ann")
    with pytest.raises(CheckpointError):
        load_classifier(db, bad)
    active = active_version(db)
    assert active is not None and active.id == good
    assert get_version(db, bad).status == "candidate"
    classifier, view = load_classifier(db)
    assert view.id == good and classifier.class_names == CLASSES


def test_load_classifier_is_cached_until_the_file_changes(db: Database) -> None:
    v1 = save_random_version(db, CLASSES, seed=1)
    activate_version(db, v1, actor="ann")
    first, _ = load_classifier(db)
    assert load_classifier(db, v1)[0] is first
    path = checkpoint_path(db, get_version(db, v1))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert load_classifier(db, v1)[0] is not first


@pytest.mark.both_databases
def test_no_active_version_is_a_clear_error(db: Database) -> None:
    with pytest.raises(NotFound, match="train"):
        load_classifier(db)
    with pytest.raises(NotFound, match="42"):
        activate_version(db, 42, actor="ann")


@pytest.mark.both_databases
def test_evaluate_version_measures_the_current_test_split(db: Database) -> None:
    store_images(db, dataset(CLASSES, train=1, val=0, test=2))
    v1 = save_random_version(db, CLASSES, seed=1)
    metrics = evaluate_version(db, v1)
    assert metrics["n_images"] == 6
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert len(metrics["confusion_matrix"]) == 3
    # A test image in a category the model never saw counts as an error, it is not left out.
    store_images(db, [("Belts", 0, "test")])
    with_new = evaluate_version(db, v1)
    assert with_new["n_images"] == 7
    assert with_new["test_set_hash"] != metrics["test_set_hash"]
    assert with_new["accuracy"] <= metrics["accuracy"] * 6 / 7 + 1e-9


def test_cli_lists_activates_evaluates_and_exports(db: Database, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from core.cli.app import app

    store_images(db, dataset(CLASSES, train=1, val=0, test=1))
    v1 = save_random_version(db, CLASSES, seed=1)
    v2 = save_random_version(db, CLASSES, seed=2)
    runner = CliRunner()
    assert runner.invoke(app, ["models", "activate", str(v2)]).exit_code == 0
    result = runner.invoke(app, ["models", "activate", str(v1)])  # rollback
    assert result.exit_code == 0 and f"v{v1} is now active" in result.output
    listed = json.loads(runner.invoke(app, ["models", "list", "--json"]).output)
    assert [(v["id"], v["status"]) for v in listed] == [(v2, "retired"), (v1, "active")]
    evaluated = json.loads(runner.invoke(app, ["evaluate", "--json"]).output)
    assert evaluated["version"] == v1 and evaluated["n_images"] == 3
    text = runner.invoke(app, ["evaluate"]).output  # a re-measure says it is on today's labels, not the stored figure
    assert f"v{v1}: test accuracy {evaluated['accuracy']:.1%} on 3 test images (today's labels)" in text
    checkpoint_path(db, get_version(db, v2)).write_bytes(b"garbage")
    refused = runner.invoke(app, ["models", "activate", str(v2)])
    assert refused.exit_code == 1 and f"v{v2}" in refused.output
    active = active_version(db)
    assert active is not None and active.id == v1
    exported = runner.invoke(app, ["export", "model", str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "out" / f"model-v{v1}.safetensors").is_file()
    sidecar = json.loads((tmp_path / "out" / f"model-v{v1}.json").read_text())
    assert sidecar["class_names"] == CLASSES


def test_model_download_holds_weights_and_sidecar_that_load_again(db: Database, tmp_path: Path) -> None:
    from models.checkpoint import load_checkpoint

    version = save_random_version(db, CLASSES, seed=3)
    weights, sidecar = checkpoint_files(db, version)
    assert weights == checkpoint_path(db, get_version(db, version)) and sidecar.suffix == ".json"
    with zipfile.ZipFile(io.BytesIO(model_archive_bytes(db, version, actor="ann"))) as archive:
        assert sorted(archive.namelist()) == [f"model-v{version}.json", f"model-v{version}.safetensors"]
        assert archive.read(f"model-v{version}.safetensors") == weights.read_bytes()
        archive.extractall(tmp_path)
    _, meta = load_checkpoint(tmp_path / f"model-v{version}.safetensors", device=torch.device("cpu"))
    assert meta.class_names == CLASSES
    with pytest.raises(NotFound, match="no model version 999"):
        checkpoint_files(db, 999)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match=rf"v{version}: checkpoint file .*\.json is missing"):
        model_archive_bytes(db, version, actor="ann")


@pytest.mark.parametrize("damage", ["nan weights", "image_size 20000"])
def test_a_checkpoint_with_unusable_values_is_refused_and_the_active_version_keeps_serving(
    db: Database, damage: str
) -> None:
    import json

    from safetensors.torch import load_file, save_file

    good = save_random_version(db, CLASSES, seed=1)
    activate_version(db, good, actor="ann")
    bad = save_random_version(db, CLASSES, seed=2)
    path = checkpoint_path(db, get_version(db, bad))
    if damage == "nan weights":
        state = load_file(str(path))
        state["fc.weight"][0, 0] = float("nan")
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "image_size": 20000}))
    with pytest.raises(CheckpointError, match=f"model v{bad}: checkpoint .* is not usable"):
        activate_version(db, bad, actor="ann")
    active = active_version(db)
    assert active is not None and active.id == good and get_version(db, bad).status == "candidate"
    classifier, view = load_classifier(db)
    probs = classifier.predict_pixels(torch.zeros((2, 32, 32, 3), dtype=torch.uint8).numpy())
    assert view.id == good and torch.isfinite(torch.from_numpy(probs)).all()
