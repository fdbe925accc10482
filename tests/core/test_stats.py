"""Catalogue stats: counts per category and split that match what was inserted, and stay fast at 100k images."""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.catalog import labels
from core.catalog.stats import UNLABELLED, catalogue_stats
from core.db import Database
from tests.core.factories import FakeImage, build, populate

# Each test but the 100k one runs on PostgreSQL too (its 100k-row set-up alone takes 20 s there).


@pytest.mark.both_databases
def test_counts_per_category_and_split(db: Database) -> None:
    build(
        db,
        [
            FakeImage(split="train", label="Shoes"),
            FakeImage(split="train", label="Shoes"),
            FakeImage(split="val", label="Shoes"),
            FakeImage(split="test", label="Bags"),
            FakeImage(split="train"),
            FakeImage(split="test"),
        ],
        with_version=False,
    )
    stats = catalogue_stats(db)
    assert (stats.total_images, stats.labelled, stats.unlabelled, stats.categories) == (6, 4, 2, 3)
    frame = stats.to_frame()
    assert frame.loc["Shoes", ["train", "val", "test", "total"]].tolist() == [2, 1, 0, 3]
    assert frame.loc["Bags", "test"] == 1
    assert frame.loc["Hats", "total"] == 0  # a live category with no images still shows up
    assert frame.loc[UNLABELLED, ["train", "test"]].tolist() == [1, 1]
    assert frame["total"].sum() == stats.total_images
    assert stats.as_dict()["table"][-1]["category"] == UNLABELLED


@pytest.mark.both_databases
def test_archived_categories_appear_only_while_they_hold_labels(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label="Hats")], with_version=False)
    labels.archive_category(db, "Bags", actor="admin")
    labels.archive_category(db, "Hats", actor="admin")
    stats = catalogue_stats(db)
    frame = stats.to_frame()
    assert "Bags" not in frame.index
    assert bool(frame.loc["Hats", "archived"]) and frame.loc["Hats", "total"] == 1
    assert stats.categories == 1  # only Shoes is live
    labels.clear_label(db, int(made.image_ids[0]), actor="a")
    assert "Hats" not in catalogue_stats(db).to_frame().index


@pytest.mark.both_databases
def test_empty_catalogue(db: Database) -> None:
    stats = catalogue_stats(db)
    assert (stats.total_images, stats.labelled, stats.unlabelled, stats.categories) == (0, 0, 0, 0)
    assert [r.category for r in stats.rows] == [UNLABELLED]


def test_hundred_thousand_images_counted_in_sql_quickly(db: Database) -> None:
    made = populate(db, n_images=100_000, with_version=False, seed=3)
    start = time.perf_counter()
    stats = catalogue_stats(db)
    elapsed = time.perf_counter() - start
    assert stats.total_images == 100_000
    assert stats.labelled == int((made.labels >= 0).sum())
    frame = stats.to_frame()
    shoes = made.id_of("Shoes")
    assert frame.loc["Shoes", "train"] == int(((made.labels == shoes) & (made.splits == "train")).sum())
    assert frame.loc[UNLABELLED, "total"] == int(np.sum(made.labels < 0))
    # Loading 100k ORM rows takes seconds; two GROUP BY queries take well under one.
    assert elapsed < 1.5, f"catalogue_stats took {elapsed:.2f}s at 100k images"
