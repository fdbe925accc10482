"""The Fashion-MNIST demo: idx parsing, balanced choice, and the `demo fashion-mnist` command end to end."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.catalog.demo import (
    FASHION_MNIST_CLASSES,
    balanced_indices,
    file_name,
    load_fashion_mnist,
    local_dir,
    local_files_present,
    read_idx,
)
from core.db import Database
from core.schema import Category, Image, Label, LabelEvent

ROOT = Path(__file__).resolve().parents[2]


def _require_dataset() -> None:
    """Skip locally without the Debian package; in CI (.ci/run installs it) its absence is a failure."""
    if local_files_present():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"Fashion-MNIST idx files missing from {local_dir()}: .ci/run must install dataset-fashion-mnist")
    pytest.skip(f"Fashion-MNIST not installed in {local_dir()} (apt-get install dataset-fashion-mnist)")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_read_idx_round_trips_and_refuses_truncated_files(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    good = tmp_path / "good-images-idx3-ubyte.gz"
    _write_idx(good, images)
    np.testing.assert_array_equal(read_idx(good), images)

    truncated = tmp_path / "cut-images-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:-10]))
    with pytest.raises(ValueError, match=r"cut-images-idx3-ubyte\.gz"):
        read_idx(truncated)
    not_idx = tmp_path / "text.gz"
    not_idx.write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(not_idx)


def test_balanced_indices_take_the_first_of_each_class_in_official_order() -> None:
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    chosen = balanced_indices(labels, 6, num_classes=3)
    assert chosen.tolist() == [0, 1, 2, 3, 4, 6]
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 2]
    # A remainder goes to the first classes; no limit keeps everything.
    assert np.bincount(labels[balanced_indices(labels, 7, num_classes=3)]).tolist() == [3, 2, 2]
    assert balanced_indices(labels, None, num_classes=3).tolist() == list(range(10))


def test_local_fashion_mnist_has_the_official_shapes() -> None:
    _require_dataset()
    test = load_fashion_mnist("test")
    assert test.images.shape == (10_000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def _run_demo(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRODCAT_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "core.cli", "demo", "fashion-mnist", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_imports_labelled_pngs_once(db: Database, data_dir: Path) -> None:
    _require_dataset()
    first = _run_demo(data_dir, "--limit", "30", "--actor", "demo-tester")
    assert first.returncode == 0, first.stderr
    assert "30 imported, 0 duplicates, 0 refused" in first.stdout

    with db.read() as session:
        images = session.scalars(select(Image)).all()
        assert len(images) == 30
        assert {image.format.upper() for image in images} == {"PNG"}
        assert {(image.width, image.height) for image in images} == {(28, 28)}
        assert all(image.original_name.startswith("fmnist_train_") for image in images)
        assert {image.uploaded_by for image in images} == {"demo-tester"}
        per_category = dict(
            session.execute(select(Category.name, func.count(Label.image_id)).join(Label).group_by(Category.name)).all()
        )
        assert per_category == {name: 3 for name in FASHION_MNIST_CLASSES}
        # The label matches the official one: image 0 of the train set is an Ankle boot.
        first_image = session.scalar(select(Image).where(Image.original_name == file_name("train", 0)))
        assert first_image is not None and first_image.label is not None
        assert first_image.label.category.name == "Ankle boot"
        events_before = session.scalar(select(func.count(LabelEvent.id)))

    second = _run_demo(data_dir, "--limit", "30")
    assert second.returncode == 0, second.stderr
    assert "0 imported, 30 duplicates, 0 refused" in second.stdout
    with db.read() as session:
        assert session.scalar(select(func.count(Image.id))) == 30
        assert session.scalar(select(func.count(Label.image_id))) == 30
        assert session.scalar(select(func.count(LabelEvent.id))) == events_before


def test_demo_refuses_a_bad_limit_clearly(data_dir: Path) -> None:
    result = _run_demo(data_dir, "--limit", "0")
    assert result.returncode != 0
    assert "--limit" in result.stderr
