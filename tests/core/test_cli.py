"""The data commands of `python -m core.cli`, driven through typer's CliRunner and one real subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import select
from typer.testing import CliRunner, Result

import core.cli  # noqa: F401  (registers every command module on the app)
from core.cli.app import app
from core.db import Database
from tests.imagegen import image_bytes, write_image_folder

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def cli(*args: str | Path | int) -> Result:
    """Run one command in-process; returns click's Result (exit_code, stdout, stderr, output)."""
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args: str | Path | int) -> Any:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = write_image_folder(tmp_path / "photos", per_category=2, size=24)
    (root / "Shoes" / "notes.txt").write_text("not a photo")
    return root


@pytest.fixture
def imported(db: Database, photos: Path) -> Database:
    result = cli("import", photos, "--labels-from-folders", "--actor", "alice")
    assert result.exit_code == 0, result.output
    return db


def test_import_reports_counts_labels_and_each_refusal(db: Database, photos: Path) -> None:
    result = cli("import", photos, "--labels-from-folders", "--actor", "alice")
    assert result.exit_code == 0, result.output
    assert "6 imported, 0 duplicates, 1 refused" in result.stdout
    assert "Labelled: Bags 2, Hats 2, Shoes 2" in result.stdout
    assert "notes.txt" in result.stderr  # the refused file is named, with its reason
    again = cli("import", photos, "--json")
    assert again.exit_code == 1  # nothing new went in and something was refused
    report = json.loads(again.stdout)
    assert len(report["duplicates"]) == 6 and report["imported"] == []
    stats = run_json("stats")
    assert (stats["total_images"], stats["labelled"], stats["categories"]) == (6, 6, 3)


def test_import_fails_only_when_nothing_went_in(db: Database, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    result = cli("import", bad, tmp_path / "missing.png")
    assert result.exit_code == 1
    assert "bad.jpg" in result.stderr and "missing.png: no such file or folder" in result.stderr
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes("Hats", 1, size=24))
    mixed = cli("import", bad, good, "--category", "Hats")
    assert mixed.exit_code == 0 and "1 imported" in mixed.stdout
    assert run_json("categories", "list") == [
        {"id": 1, "name": "Hats", "labelled": 1, "archived": False, "archived_at": None, "merged_into": None}
    ]


def test_import_refuses_two_ways_of_labelling(db: Database, photos: Path) -> None:
    result = cli("import", photos, "--labels-from-folders", "--category", "Shoes")
    assert result.exit_code == 1
    assert "--labels-from-folders and --category" in result.stderr
    assert run_json("stats")["total_images"] == 0


def test_label_history_undo_and_clear_errors(imported: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "dana")
    result = cli("label", "1", "Hats")
    assert result.exit_code == 0 and "-> Hats" in result.stdout
    history = run_json("history", "1")
    assert (history[0]["actor"], history[0]["action"], history[0]["new_category"]) == ("dana", "set", "Hats")
    assert history[-1]["actor"] == "alice"

    wrong = cli("label", "1", "Sandals")
    assert wrong.exit_code == 1
    assert "Error: no category 'Sandals'" in wrong.stderr and "Traceback" not in wrong.output
    missing = cli("label", "999", "Hats")
    assert missing.exit_code == 1 and "no image with id 999" in missing.stderr

    undo = cli("undo")
    assert undo.exit_code == 0 and "Image 1: Hats ->" in undo.stdout
    assert run_json("history", "1")[0]["action"] == "undo"
    assert cli("undo").exit_code == 1  # dana has nothing left to undo

    monkeypatch.setenv("PRODCAT_DEFAULT_ACTOR", "shop-team")
    from core.settings import get_settings

    get_settings.cache_clear()
    assert cli("unlabel", "2").exit_code == 0
    assert run_json("history", "2")[0]["actor"] == "shop-team"


def test_categories_commands(imported: Database) -> None:
    assert cli("categories", "add", "Scarves").exit_code == 0
    duplicate = cli("categories", "add", "Scarves")
    assert duplicate.exit_code == 1 and "'Scarves' already exists" in duplicate.stderr
    renamed = cli("categories", "rename", "Shoes", "Footwear")
    assert renamed.exit_code == 0 and "'Shoes' to 'Footwear'" in renamed.stdout
    onto_self = cli("categories", "merge", "Hats", "Hats")
    assert onto_self.exit_code == 1 and "onto itself" in onto_self.stderr
    merged = cli("categories", "merge", "Hats", "Bags")
    assert merged.exit_code == 0 and "2 labels moved" in merged.stdout
    assert cli("categories", "archive", "Scarves").exit_code == 0
    archived = cli("label", "1", "Scarves")
    assert archived.exit_code == 1 and "archived" in archived.stderr

    live = {c["name"]: c["labelled"] for c in run_json("categories", "list")}
    assert live == {"Bags": 4, "Footwear": 2}
    text = cli("categories", "list", "--all").stdout
    assert "merged into Bags" in text and "archived" in text


def test_export_commands(imported: Database, photos: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    result = cli("export", "labels", csv_path)
    assert result.exit_code == 0 and "Wrote 6 labels" in result.stdout
    assert csv_path.read_text(encoding="utf-8-sig").splitlines()[0] == "filename,category"

    out = tmp_path / "tree"
    result = cli("export", "imagefolder", out)
    assert result.exit_code == 0 and "Wrote 6 images in 3 category folders" in result.stdout
    exported = {(p.parent.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in out.rglob("*.png")}
    source = {(p.parent.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in photos.rglob("*.png")}
    assert exported == source
    again = cli("export", "imagefolder", out)
    assert again.exit_code == 1 and "not empty" in again.stderr


def test_stats_text_table(imported: Database) -> None:
    text = cli("stats").stdout
    assert "6 images: 6 labelled, 0 unlabelled; 3 categories" in text
    assert "(unlabelled)" in text and "Shoes" in text


def _all_commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (command path, click command) below a group (typer ships its own click, so duck-typed)."""
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        found.append((path, command))
        if hasattr(command, "commands"):
            found.extend(_all_commands(command, path))
    return found


def test_every_data_command_has_help(db: Database) -> None:
    root = typer.main.get_command(app)
    commands = dict(_all_commands(root))
    mine = [
        ("import",),
        ("label",),
        ("unlabel",),
        ("undo",),
        ("history",),
        ("stats",),
        ("categories",),
        ("categories", "list"),
        ("categories", "add"),
        ("categories", "rename"),
        ("categories", "merge"),
        ("categories", "archive"),
        ("categories", "unarchive"),
        ("categories", "delete"),
        ("images",),
        ("images", "delete"),
        ("images", "check-files"),
        ("export",),
        ("export", "labels"),
        ("export", "imagefolder"),
    ]
    for path in mine:
        assert path in commands, f"missing command {' '.join(path)}"
        result = cli(*path, "--help")
        assert result.exit_code == 0, f"{' '.join(path)} --help failed: {result.output}"
        text = commands[path].help or ""
        assert len(text) > 20 and text.split(".")[0].split()[0] in result.stdout, f"{' '.join(path)}: no help"
    assert cli("--help").exit_code == 0


def test_real_subprocess_import_and_stats(data_dir: Path, tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "sub", per_category=1, size=24)
    env = {**os.environ, "PRODCAT_DATA_DIR": str(data_dir)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )

    imported = run("import", str(photos), "--labels-from-folders", "--actor", "erin")
    assert imported.returncode == 0, imported.stderr
    assert "3 imported" in imported.stdout
    stats = run("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["labelled"] == 3
    refused = run("categories", "merge", "Shoes", "Shoes")
    assert refused.returncode == 1 and "onto itself" in refused.stderr and "Traceback" not in refused.stderr


def test_models_list_has_a_backbone_source_column(db: Database) -> None:
    from tests.core.training_helpers import add_version_row

    add_version_row(db, status="retired", pretrained_source="none")
    add_version_row(db, status="active", arch="efficientnet_lite0", pretrained_source="bundled:efficientnet_lite0")
    result = cli("models", "list")
    assert result.exit_code == 0, result.output
    header, newest, oldest = result.stdout.splitlines()
    assert header.rstrip().endswith("created           backbone source")
    assert newest.startswith("*    2  active") and newest.endswith("  bundled:efficientnet_lite0")
    assert oldest.endswith("  none")


def test_train_says_which_backbone_it_starts_from_before_queueing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.jobs import queue as jobs
    from tests.core.training_helpers import dataset, store_images

    store_images(db, dataset(("Shoes", "Bags"), train=2, val=1, test=1))
    monkeypatch.setattr(jobs, "ensure_worker", lambda db: False)  # queue only: no worker process in this test
    result = cli("train", "--mode", "quick")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "backbone: resnet18 with random initial weights: accuracy will be much lower than with pretrained weights "
        "(pretrained weights switched off). A new lineage (first model).",
        "  Expected first model: about 38% test accuracy with 100 labelled images (8 now); measured with random "
        "initial weights on Fashion-MNIST: 100 labels 38%, 300 labels 47%, 1,000 labels 54%, 3,000 labels 61% "
        "(quick mode, the CPU default; docs/benchmarks.md). Your photos will differ.",
        "queued training job 1 (quick)",
    ]


def test_train_refuses_a_bad_weights_file_before_queueing(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.db import open_database
    from core.jobs.queue import list_jobs
    from core.settings import get_settings
    from tests.core.training_helpers import dataset, store_images
    from tests.core.weightsfiles import write_corrupt_weights

    broken = write_corrupt_weights(tmp_path / "broken.safetensors")
    monkeypatch.setenv("PRODCAT_PRETRAINED", "file")
    monkeypatch.setenv("PRODCAT_PRETRAINED_FILE", str(broken))
    get_settings.cache_clear()
    db = open_database(get_settings())
    store_images(db, dataset(("Shoes", "Bags"), train=2, val=1, test=1))
    result = cli("train", "--mode", "quick")
    assert result.exit_code == 1
    assert f"training refused: pretrained weights refused: pretrained weights file {broken} is not a readable" in (
        result.stderr
    )
    assert list_jobs(db) == []


def test_categories_delete_moves_labels_or_refuses(imported: Database) -> None:
    refused = cli("categories", "delete", "Hats")
    assert refused.exit_code == 1 and "'Hats' has 2 labelled images" in refused.stderr and "--move-to" in refused.stderr
    moved = cli("categories", "delete", "Hats", "--move-to", "Bags", "--actor", "admin")
    assert moved.exit_code == 0, moved.output
    assert "Deleted category 'Hats' (kept in the history as deleted); 2 labels moved to 'Bags'." in moved.stdout
    assert cli("categories", "add", "Typo").exit_code == 0
    gone = cli("categories", "delete", "Typo")
    assert gone.exit_code == 0 and "Deleted category 'Typo'." in gone.stdout
    assert {c["name"]: c["labelled"] for c in run_json("categories", "list", "--all")} == {"Bags": 4, "Shoes": 2}


def test_images_delete_removes_rows_and_files_with_an_audit_row(imported: Database) -> None:
    from core.schema import Image, ImageEvent

    with imported.read() as session:
        image = session.get(Image, 2)
        assert image is not None
        stored = imported.settings.data_dir / image.stored_path
    assert stored.is_file()
    missing = cli("images", "delete", "2", "999")
    assert missing.exit_code == 1 and "no image with id 999" in missing.stderr
    result = cli("images", "delete", "2", "3", "--reason", "blurry", "--actor", "ops")
    assert result.exit_code == 0, result.output
    assert "Deleted image 2 (" in result.stdout and "Deleted image 3 (" in result.stdout
    assert not stored.exists()
    with imported.read() as session:
        assert session.get(Image, 2) is None and session.get(Image, 3) is None
        events = session.scalars(select(ImageEvent).order_by(ImageEvent.image_id)).all()
        assert [(e.image_id, e.actor, e.action) for e in events] == [(2, "ops", "delete"), (3, "ops", "delete")]
        assert all(e.note.startswith("blurry") for e in events)
    assert cli("stats").stdout.startswith("4 images")


def test_images_set_sku_sets_and_clears_with_audit_rows_and_refuses_a_bad_sku(imported: Database) -> None:
    from core.schema import AuditEvent, Image

    result = cli("images", "set-sku", "1", "2", "--sku", " TSH-0042 ", "--actor", "alice")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["Image 1: SKU 'TSH-0042'.", "Image 2: SKU 'TSH-0042'."]
    tab = cli("images", "set-sku", "3", "--sku", "TSH\t1")
    assert tab.exit_code == 1 and "SKU 'TSH\\t1' contains a control character (U+0009)" in tab.stderr
    assert cli("images", "set-sku", "2", "999", "--sku", "X").stderr.count("no image with id 999") == 1
    assert cli("images", "set-sku", "2").exit_code == 1  # neither --sku nor --clear
    cleared = cli("images", "set-sku", "2", "--clear", "--actor", "alice")
    assert cleared.stdout == "Image 2: SKU 'TSH-0042' removed.\n"
    with imported.read() as session:
        skus = {i.id: i.sku for i in session.scalars(select(Image).where(Image.id <= 3))}
        audit = [(a.subject, a.detail) for a in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert skus == {1: "TSH-0042", 2: None, 3: None}
    assert audit == [
        ("image 1", {"field": "sku", "old": None, "new": "TSH-0042"}),
        ("image 2", {"field": "sku", "old": None, "new": "TSH-0042"}),
        ("image 2", {"field": "sku", "old": "TSH-0042", "new": None}),
    ]


def test_train_wait_progress_is_one_line_per_phase_with_believable_rates() -> None:
    """`train --wait`'s progress: a line per phase (per epoch while training), each with its own count and time.

    Features arrive 128 at a time, the first report after the first batch: timed from that report, the bar read
    "128/474 [00:00, 615677 step/s]"; and phases without a count ("saving") showed the "1/1" of the fit before them.
    """
    import io
    import re
    import time

    from core.cli.model import JobBars
    from core.ml.contract import ProgressReport as Report

    out = io.StringIO()
    bars = JobBars(file=out)
    bars.show(Report(phase="preparing"))
    time.sleep(0.3)  # the first batch of features is being extracted
    bars.show(Report(phase="features (train)", stage="features", step=128, steps=256))
    bars.show(Report(phase="features (train)", stage="features", step=256, steps=256))
    bars.show(Report(phase="fitting head", stage="head", step=0, steps=1))
    bars.show(Report(phase="fitting head", stage="val", step=1, steps=1, train_acc=1.0, val_acc=0.9))
    bars.show(Report(phase="training (train)", stage="train", epoch=1, epochs=2, step=3, steps=3, loss=0.5))
    bars.show(Report(phase="training (val)", stage="val", epoch=1, epochs=2, val_acc=0.8))
    bars.show(Report(phase="training (train)", stage="train", epoch=2, epochs=2, step=3, steps=3))
    bars.show(Report(phase="saving"))
    bars.close()

    lines = [line.split("\r")[-1] for line in out.getvalue().split("\n") if line.strip("\r")]
    names = [line.split(":")[0] for line in lines]
    assert names == [
        "preparing",
        "features (train)",
        "fitting head",
        "training epoch 1/2",
        "training epoch 2/2",
        "saving",
    ]
    features = lines[1]
    rate = re.search(r"([\d.]+)img/s", features)
    assert "256/256" in features and rate is not None
    assert float(rate.group(1)) < 1000  # 256 images in at least 0.3 s, not hundreds of thousands a second
    assert "1/1" not in lines[2] and "val_acc=0.900" in lines[2]
    assert "3/3" in lines[3] and "batch" in lines[3] and "val_acc=0.800" in lines[3]  # the epoch's validation
    assert "/" not in lines[5]  # saving: its time, not another phase's count
