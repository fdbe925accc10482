"""Choosing the pretrained backbone: a weights file picked from the exchange folder, what the next retrain starts
from, and the notice about models trained from random weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import core.ml.backbone
from core.catalog.serverfiles import PathRefused
from core.db import Database, open_database
from core.errors import TrainingRefused
from core.ml.backbone import (
    ExpectedAccuracy,
    backbone_choice,
    clear_weights_selection,
    effective_pretrained_file,
    next_start,
    plan_lineage,
    selected_weights,
    starting_weights,
    use_weights_file,
    weights_dir,
)
from core.ml.versions import active_version
from core.settings import Settings, get_settings
from core.views.overview import home_overview
from tests.core.training_helpers import add_version_row
from tests.core.weightsfiles import pretrained_auto, write_corrupt_weights, write_resnet18_weights

GOOD = "shop-backbone.safetensors"


@pytest.fixture
def auto(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    pretrained_auto(monkeypatch)
    return get_settings()


@pytest.fixture
def auto_db(auto: Settings) -> Database:
    return open_database(auto)


def _good(settings: Settings, name: str = GOOD) -> Path:
    return write_resnet18_weights(settings.exchange_dir / name)


def _active_bundled(db: Database) -> int:
    return add_version_row(
        db, status="active", arch="efficientnet_lite0", pretrained_source="bundled:efficientnet_lite0"
    )


def test_a_good_file_becomes_the_choice_and_the_next_retrain_starts_a_new_lineage_from_it(auto_db: Database) -> None:
    settings = auto_db.settings
    parent_id = _active_bundled(auto_db)
    parent = active_version(auto_db)
    assert plan_lineage(settings, parent=parent).continue_from == parent_id  # nothing chosen: the lineage goes on

    source = _good(settings)
    chosen = use_weights_file(open_database(settings), GOOD, actor="ann")
    assert chosen.arch == "resnet18" and chosen.label == f"file:{GOOD}"
    copy = weights_dir(settings) / GOOD
    assert chosen.path == copy and copy.read_bytes() == source.read_bytes()
    record = json.loads((weights_dir(settings) / "selected.json").read_text())
    assert record["arch"] == "resnet18" and record["file"] == GOOD and record["chosen_by"] == "ann"
    assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest() and record["chosen_at"]
    assert effective_pretrained_file(settings) == copy

    source.unlink()  # the exchange folder is a drop box: the choice lives on in the data directory
    lineage = plan_lineage(settings, parent=parent)
    assert lineage.continue_from is None and lineage.arch == "resnet18"
    assert lineage.source_label == f"file:{GOOD}"
    assert f"A new lineage: v{parent_id} started from bundled" in lineage.describe()
    start = next_start(auto_db)
    assert start.new_lineage and start.problem is None and str(copy) in start.description

    # A version that already started from the chosen file is continued, not restarted every time.
    resnet = add_version_row(auto_db, status="active", arch="resnet18", pretrained_source=f"file:{GOOD}")
    assert plan_lineage(settings, parent=active_version(auto_db)).continue_from == resnet

    assert clear_weights_selection(auto_db, actor="ann") is not None
    assert selected_weights(settings) is None and not copy.exists()
    assert effective_pretrained_file(settings) is None


def test_a_corrupt_file_is_refused_with_its_name_and_the_previous_choice_stays(auto: Settings) -> None:
    _good(auto)
    use_weights_file(open_database(auto), GOOD, actor="ann")
    write_corrupt_weights(auto.exchange_dir / "half-uploaded.safetensors")
    with pytest.raises(TrainingRefused) as refused:
        use_weights_file(open_database(auto), "half-uploaded.safetensors", actor="ann")
    assert "half-uploaded.safetensors" in str(refused.value)
    assert "is not a readable safetensors file" in str(refused.value)
    chosen = selected_weights(auto)
    assert chosen is not None and chosen.file == GOOD
    assert sorted(p.name for p in weights_dir(auto).iterdir()) == ["selected.json", GOOD]


def test_a_file_for_another_architecture_is_refused_as_the_setting_would_refuse_it(
    auto: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRODCAT_DEFAULT_ARCH", "resnet50")
    named = _good(Settings())  # metadata says resnet18
    unnamed = write_resnet18_weights(named.with_name("plain.safetensors"), arch=None)
    settings = Settings()
    with pytest.raises(TrainingRefused) as picked:
        use_weights_file(open_database(settings), GOOD, actor="ann")
    monkeypatch.setenv("PRODCAT_PRETRAINED_FILE", str(named))
    with pytest.raises(TrainingRefused) as configured:
        starting_weights(Settings(), "resnet50")
    assert str(picked.value) == str(configured.value)
    assert "holds resnet18 weights, but the architecture is resnet50" in str(picked.value)
    # No metadata: the network is built for the configured architecture, and the shapes give it away.
    with pytest.raises(TrainingRefused, match=r"plain\.safetensors does not match the architecture"):
        use_weights_file(open_database(settings), "plain.safetensors", actor="ann")
    assert unnamed.exists() and selected_weights(settings) is None


def test_a_file_naming_no_architecture_needs_the_default_architecture(auto: Settings) -> None:
    write_resnet18_weights(auto.exchange_dir / "plain.safetensors", arch=None)
    with pytest.raises(TrainingRefused, match=r"plain\.safetensors does not say which architecture.*DEFAULT_ARCH"):
        use_weights_file(open_database(auto), "plain.safetensors", actor="ann")
    assert selected_weights(auto) is None


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "OUTSIDE", "link"])
def test_names_escaping_the_exchange_folder_are_refused(auto: Settings, name: str) -> None:
    outside = write_resnet18_weights(auto.data_dir / "outside.safetensors")
    auto.exchange_dir.mkdir(parents=True, exist_ok=True)
    (auto.exchange_dir / "sub").mkdir()
    os.symlink(outside, auto.exchange_dir / "link.safetensors")
    name = {"OUTSIDE": str(outside), "link": "link.safetensors"}.get(name, name)
    with pytest.raises(PathRefused) as refused:
        use_weights_file(open_database(auto), name, actor="ann")
    assert name in str(refused.value)
    assert selected_weights(auto) is None and not weights_dir(auto).exists()
    assert backbone_choice(auto).candidates == []  # the link out is not offered either


def test_the_choice_lists_weights_files_in_the_exchange_folder_only(auto: Settings) -> None:
    write_corrupt_weights(auto.exchange_dir / "b.safetensors")
    write_corrupt_weights(auto.exchange_dir / "models" / "a.SAFETENSORS")
    write_corrupt_weights(auto.exchange_dir / ".hidden.safetensors")
    (auto.exchange_dir / "photos").mkdir()
    (auto.exchange_dir / "photos" / "shoe.png").write_bytes(b"png")
    choice = backbone_choice(auto)
    assert choice.candidates == ["b.safetensors", "models/a.SAFETENSORS"]
    assert choice.chosen is None and choice.problem is None


def test_the_environment_wins_over_the_choice_and_says_so(auto: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    use_weights_file(open_database(auto), _good(auto).name, actor="ann")
    env_file = write_resnet18_weights(auto.data_dir / "ops" / "ops.safetensors")
    monkeypatch.setenv("PRODCAT_PRETRAINED_FILE", str(env_file))
    settings = Settings()
    assert effective_pretrained_file(settings) == env_file
    assert starting_weights(settings, None).label == "file:ops.safetensors"
    [note] = backbone_choice(settings).notes
    assert "PRODCAT_PRETRAINED_FILE" in note and GOOD in note


def test_a_damaged_choice_record_refuses_training_until_cleared(auto_db: Database) -> None:
    settings = auto_db.settings
    weights_dir(settings).mkdir(parents=True)
    (weights_dir(settings) / "selected.json").write_text('{"file": "../../prodcat.sqlite3", "arch": "resnet18"}')
    start = next_start(auto_db)
    assert start.problem is not None and "selected.json is damaged" in start.problem
    assert backbone_choice(settings).problem == start.problem
    clear_weights_selection(auto_db, actor="ann")
    assert next_start(auto_db).problem is None


def test_the_next_start_names_the_automatic_backbone_and_the_measured_accuracy_only_when_known(
    auto_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = next_start(auto_db)
    assert start.new_lineage and start.source_label == "bundled:efficientnet_lite0"
    assert start.description.startswith("efficientnet_lite0 with ImageNet weights installed with the app")
    assert start.expected is not None and start.expected.source == "bundled"  # the shipped, measured curve
    monkeypatch.setattr(core.ml.backbone, "EXPECTED_ACCURACY", {"hub": ((100, 0.9),)})
    assert next_start(auto_db).expected is None  # never measured for these weights: nothing said
    monkeypatch.setattr(core.ml.backbone, "EXPECTED_ACCURACY", {"bundled": ((50, 0.61), (500, 0.82))})
    expected = next_start(auto_db, labelled=900).expected
    assert expected == ExpectedAccuracy("bundled", ((50, 0.61), (500, 0.82)))
    assert "about 82% test accuracy with 500 labelled images (900 now)" in expected.describe(900)
    assert "about 61% test accuracy with 50 labelled images (20 now)" in expected.describe(20)
    assert "the bundled ImageNet weights on Fashion-MNIST: 50 labels 61%, 500 labels 82%" in expected.describe(20)


@pytest.mark.parametrize(
    ("source", "warned"),
    [("none", True), ("bundled:efficientnet_lite0", False), ("hub:resnet18", False), (f"file:{GOOD}", False)],
)
def test_the_random_weights_notice_fires_for_a_random_start_only(db: Database, source: str, warned: bool) -> None:
    add_version_row(db, status="active", pretrained_source=source)
    notice = home_overview(db).pretrained_notice
    assert (notice is not None and "without pretrained weights" in notice) is warned
