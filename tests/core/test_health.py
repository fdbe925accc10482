"""Data health: every finding counts what it says and points at the queue that shows those images."""

from __future__ import annotations

from typing import Any

from core.db import Database
from core.views.health import data_health
from core.views.review import review_queue
from tests.core.factories import FakeImage, build, catalogue_with_findings


def test_findings_count_what_they_say_and_open_the_matching_queue(db: Database) -> None:
    ids = catalogue_with_findings(db)
    health = data_health(db)
    assert (health.total, health.unlabelled) == (16, 3)
    assert health.labels.open_issues == 1 and health.duplicates.groups == 0
    by_title = {f.title: f for f in health.findings()}
    # A finding's `review` holds review_queue's filters by name (strings, which it parses).
    wrong: dict[str, Any] = by_title["1 likely wrong labels"].review
    assert [i.image_id for i in review_queue(db, **wrong).items] == [ids[0]]
    unlabelled: dict[str, Any] = by_title["3 unlabelled photos"].review
    assert review_queue(db, **unlabelled).total == 3
    shoes = next(c for c in health.categories if c.category == "Shoes")
    assert (shoes.train, shoes.val, shoes.test, shoes.likely_wrong) == (3, 1, 1, 1) and not shoes.too_small


def test_a_category_too_small_to_train_is_named(db: Database) -> None:
    catalogue_with_findings(db)
    build(db, [FakeImage(split="train", label="Scarves")], categories=("Scarves",), with_version=False)
    health = data_health(db)
    small = next(f for f in health.findings() if "too small to train" in f.title)
    assert "Scarves" in small.detail and [c.category for c in health.categories if c.too_small] == ["Scarves"]


def test_an_empty_catalogue_needs_no_attention(db: Database) -> None:
    health = data_health(db)
    assert health.findings() == [] and health.total == 0 and health.imbalance is None
