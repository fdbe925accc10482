"""Done-when: import labelled photos, queue a quick retrain, let the real worker process train it, then predict
new files from the command line with the model it activated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core.catalog.ingest import import_paths
from core.db import Database
from core.jobs.queue import enqueue_training, get_job
from core.ml.training import training_plan
from core.ml.versions import active_version
from tests.imagegen import CATEGORY_COLOURS, image_bytes, write_image_folder

ROOT = Path(__file__).resolve().parents[2]


def _env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PRODCAT_DATA_DIR": str(data_dir),
            "PRODCAT_IMAGE_SIZE": "32",
            "PRODCAT_PRETRAINED": "none",
            "PRODCAT_DEVICE": "cpu",
        }
    )
    env.pop("PRODCAT_DATABASE_URL", None)
    return env


def _import_until_every_category_can_train(db: Database, folder: Path) -> None:
    """Splits are fixed by each image's hash, so keep adding photos of a category until it has 2 train + 1 val."""
    write_image_folder(folder, per_category=10, size=40)
    result = import_paths(db, [folder], labels_from_folders=True, actor="tester")
    assert not result.refused and len(result.imported) == 30
    next_index = 10
    for _ in range(10):
        lacking = [c.name for c in training_plan(db).categories if c.train < 2 or c.val < 1]
        if not lacking:
            return
        extra = folder.parent / f"extra{next_index}"
        for name in lacking:
            (extra / name).mkdir(parents=True)
            for i in range(next_index, next_index + 5):
                (extra / name / f"{name.lower()}_{i}.png").write_bytes(image_bytes(name, i, size=40))
        import_paths(db, [extra], labels_from_folders=True, actor="tester")
        next_index += 5
    raise AssertionError(f"could not get train and val images for every category: {training_plan(db)}")


def test_import_train_in_the_worker_process_and_predict_new_files(db: Database, tmp_path: Path) -> None:
    _import_until_every_category_can_train(db, tmp_path / "photos")
    plan = training_plan(db)
    assert plan.ok, plan.problems
    job_id = enqueue_training(db, "quick", {"arch": "resnet18", "image_size": 32, "head_l2": 1e-3}, "tester")

    worker = subprocess.run(
        [sys.executable, "-m", "core.jobs.worker", "--once"],
        cwd=ROOT,
        env=_env(db.settings.data_dir),
        capture_output=True,
        text=True,
        timeout=240,
    )
    job = get_job(db, job_id)
    assert job.status == "succeeded", (job.error, worker.stderr[-3000:])
    version = active_version(db)
    assert version is not None and version.id == job.model_version_id
    assert set(version.class_names) == set(CATEGORY_COLOURS)
    assert version.arch == "resnet18" and version.image_size == 32 and version.mode == "quick"

    # New photos the catalogue has never seen, plus one file that is not an image.
    new = tmp_path / "new"
    new.mkdir()
    files = []
    for name in CATEGORY_COLOURS:
        path = new / f"new_{name.lower()}.png"
        path.write_bytes(image_bytes(name, 500, size=40))
        files.append(path)
    broken = new / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    cli = subprocess.run(
        [sys.executable, "-m", "core.cli", "predict", "--json", *map(str, files), str(broken)],
        cwd=ROOT,
        env=_env(db.settings.data_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    rows = json.loads(cli.stdout)
    assert [Path(r["file"]).name for r in rows] == [p.name for p in files] + ["broken.jpg"]
    for row in rows[:3]:
        assert row["error"] is None and row["category"] in CATEGORY_COLOURS
        assert 0 < row["confidence"] <= 1 and row["model_version"] == version.id
        assert len(row["top_k"]) == 3 and row["top_k"][0]["category"] == row["category"]
    assert rows[3]["category"] is None and rows[3]["error"]
