"""The Categories & data page imports from, and exports to, the server exchange folder only."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.catalog.ingest import LabelSource
from core.catalog.labels import list_categories
from core.catalog.stats import catalogue_stats
from core.db import Database
from core.ml.backbone import use_weights_file
from core.settings import get_settings
from tests.core.badfiles import make_zip
from tests.core.weightsfiles import pretrained_auto, write_corrupt_weights, write_resnet18_weights
from tests.imagegen import CATEGORY_COLOURS, image_bytes, write_image_folder
from tests.pages.helpers import errors_of, run_page


def _import_folder(text: str):
    at = run_page("pages/categories.py")
    next(t for t in at.text_input if t.label == "Folder path on the server").set_value(text)
    return next(b for b in at.button if b.label == "Import folder").click().run()


def test_a_folder_outside_the_exchange_folder_is_refused_and_nothing_is_read(db: Database) -> None:
    outside = write_image_folder(db.settings.data_dir.parent / "elsewhere", per_category=2)
    at = _import_folder(str(outside))
    errors = errors_of(at)
    assert errors and "outside the server exchange folder" in errors[0]
    assert catalogue_stats(db).total_images == 0


def test_a_folder_inside_the_exchange_folder_is_imported_with_folder_labels(db: Database) -> None:
    write_image_folder(db.settings.exchange_dir / "photos", per_category=2)
    at = _import_folder("photos")
    assert not at.exception and errors_of(at) == []
    stats = catalogue_stats(db)
    assert stats.total_images == 6 and stats.labelled == 6


def _import_zip(archive: bytes, *, source: LabelSource | None = None, labels: tuple[str, bytes] | None = None):
    at = run_page("pages/categories.py")
    next(u for u in at.file_uploader if u.label == "Zip archive of photos").set_value(
        ("photos.zip", archive, "application/zip")
    )
    if source is not None:
        at.radio(key="zip_source").set_value(source)
    if labels is not None:
        name, data = labels
        next(u for u in at.file_uploader if u.label.startswith("Labels CSV")).set_value((name, data, "text/csv"))
    return next(b for b in at.button if b.label == "Import zip").click().run()


def _imagefolder_zip() -> bytes:
    entries = [(f"photos/{c}/{c.lower()}_{i}.png", image_bytes(c, i)) for c in CATEGORY_COLOURS for i in range(2)]
    return make_zip(entries)


def test_an_imagefolder_zip_uploaded_without_a_csv_is_labelled_by_its_folders(db: Database) -> None:
    at = _import_zip(_imagefolder_zip())
    assert not at.exception and errors_of(at) == []
    stats = catalogue_stats(db)
    assert stats.total_images == 6 and stats.labelled == 6
    assert {c.name: c.labelled for c in list_categories(db)} == {c: 2 for c in CATEGORY_COLOURS}


def test_a_bad_labels_csv_uploaded_with_a_zip_is_named_in_the_error(db: Database) -> None:
    bad = b"filename,category\nshoes_0.png,Shoes\nhats_0.png\n"
    at = _import_zip(_imagefolder_zip(), source=LabelSource.CSV, labels=("shop-labels.csv", bad))
    errors = errors_of(at)
    assert len(errors) == 1 and "labels CSV shop\\-labels\\.csv line 3" in errors[0]  # markdown-escaped
    assert "labels CSV labels CSV" not in errors[0]
    assert catalogue_stats(db).total_images == 0


GOOD = "shop-backbone.safetensors"


def _pick_weights(name: str) -> AppTest:
    at = run_page("pages/categories.py")
    at.selectbox(key="weights_pick").set_value(name)
    return next(b for b in at.button if b.label == "Use as backbone").click().run()


def _chosen_line(at: AppTest) -> str:
    [line] = [t.value for t in at.text if t.value.startswith(("Chosen:", "No weights file chosen"))]
    return line


def test_a_corrupt_weights_file_is_refused_by_name_and_the_previous_choice_stays(db: Database) -> None:
    write_resnet18_weights(db.settings.exchange_dir / GOOD)
    use_weights_file(db, GOOD, actor="ann")
    write_corrupt_weights(db.settings.exchange_dir / "half-uploaded.safetensors")
    at = _pick_weights("half-uploaded.safetensors")
    assert not at.exception
    [error] = [e.replace("\\", "") for e in errors_of(at)]
    assert "half-uploaded.safetensors is not a readable safetensors file" in error
    assert _chosen_line(at).startswith(f"Chosen: {GOOD} (resnet18), sha256 ")


def test_a_weights_file_picked_here_is_the_backbone_the_train_page_names_until_cleared(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrained_auto(monkeypatch)
    settings = get_settings()
    write_resnet18_weights(settings.exchange_dir / GOOD)
    named = f"resnet18 with ImageNet-style pretrained weights from the file {settings.data_dir / 'weights' / GOOD}"
    at = _pick_weights(GOOD)
    assert not at.exception and errors_of(at) == []
    [success] = [s.value.replace("\\", "") for s in at.success]
    assert success.startswith(f"New model lineages start from {named}")
    assert _chosen_line(at).startswith(f"Chosen: {GOOD} (resnet18)")

    at.switch_page("pages/train.py").run()
    [backbone] = [i.value.replace("\\", "") for i in at.info if i.value.startswith("Backbone")]
    assert named in backbone

    at.switch_page("pages/categories.py").run()
    next(b for b in at.button if b.label == "Clear the choice").click().run()
    assert _chosen_line(at) == "No weights file chosen: new lineages follow PRODCAT_PRETRAINED (auto)."
    at.switch_page("pages/train.py").run()
    [backbone] = [i.value.replace("\\", "") for i in at.info if i.value.startswith("Backbone")]
    assert "efficientnet_lite0 with ImageNet weights installed with the app" in backbone


@pytest.mark.both_databases
def test_deleting_a_category_with_labels_moves_them_first_and_says_so(db: Database) -> None:
    from core.catalog.labels import audit_trail
    from tests.core.factories import FakeImage, build

    made = build(
        db, [FakeImage(split="train", label="Hats"), FakeImage(split="train", label="Shoes")], with_version=False
    )
    at = run_page("pages/categories.py")
    at.selectbox(key="delete_name").set_value("Hats")
    next(b for b in at.button if b.label == "Delete").click().run()
    assert any("Hats" in e.value and "move" in e.value.lower() for e in at.error)  # refused: it holds a label
    assert "Hats" in [c.name for c in list_categories(db)]

    at.selectbox(key="delete_name").set_value("Hats")
    at.selectbox(key="delete_move").set_value("Shoes")
    next(b for b in at.button if b.label == "Delete").click().run()
    assert not at.exception and errors_of(at) == []
    assert "Hats" not in [c.name for c in list_categories(db)]
    assert audit_trail(db, int(made.image_ids[0]))[0].new_category == "Shoes"
