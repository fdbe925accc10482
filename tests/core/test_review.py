"""Review queues: orders, filters, pagination, suspected mislabels and the `review` command, on known catalogues."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest
from typer.testing import CliRunner

from core.catalog.labels import merge_categories, set_label
from core.db import Database
from core.errors import NotFound, ProdcatError
from core.views.review import LabelState, ReviewOrder, review_items, review_queue
from tests.core.factories import BASE_TIME, FakeImage, Populated, build, populate

pytestmark = pytest.mark.both_databases

# Classes in order Shoes, Bags, Hats. Index = position in this list; ids are assigned in this order.
CATALOGUE = [
    FakeImage(split="test", label="Shoes", probs=(0.90, 0.05, 0.05)),  # 0 right, confident
    FakeImage(split="test", label="Shoes", probs=(0.05, 0.90, 0.05)),  # 1 confidently "Bags": likely mislabel
    FakeImage(split="val", label="Bags", probs=(0.40, 0.35, 0.25), created_at=BASE_TIME + timedelta(days=9)),  # 2
    FakeImage(split="train", label=None, probs=(0.34, 0.33, 0.33)),  # 3 the model has no idea
    FakeImage(split="test", label=None, probs=None),  # 4 no prediction at all
    FakeImage(split="train", label="Hats", probs=(0.10, 0.85, 0.05)),  # 5 disagrees, but trained on
    FakeImage(split="test", label="Hats", probs=(0.20, 0.20, 0.60)),  # 6 right, unsure
]

Queue = Callable[..., list[int]]


@pytest.fixture
def cat(db: Database) -> Populated:
    return build(db, CATALOGUE)


@pytest.fixture
def queue(db: Database, cat: Populated) -> Queue:
    """review_queue on the catalogue, returning indices into CATALOGUE."""
    first = int(cat.image_ids[0])

    def run(**kwargs: object) -> list[int]:
        page = review_queue(db, page_size=50, **kwargs)  # type: ignore[arg-type]
        return [item.image_id - first for item in page.items]

    return run


def test_score_orders_put_the_most_doubtful_first_and_unpredicted_last(queue: Queue) -> None:
    assert queue(order=ReviewOrder.LOWEST_CONFIDENCE) == [3, 2, 6, 5, 0, 1, 4]
    assert queue(order=ReviewOrder.SMALLEST_MARGIN) == [3, 2, 6, 5, 0, 1, 4]
    assert queue(order="highest-entropy") == [3, 2, 6, 5, 0, 1, 4]
    # Newest by upload time, not by id: image 2 was uploaded days after the others.
    assert queue(order=ReviewOrder.NEWEST) == [2, 6, 5, 4, 3, 1, 0]


def test_label_state_split_and_category_filters(queue: Queue) -> None:
    order = ReviewOrder.NEWEST
    assert sorted(queue(order=order, label_state=LabelState.UNLABELLED)) == [3, 4]
    assert sorted(queue(order=order, label_state="labelled")) == [0, 1, 2, 5, 6]
    assert sorted(queue(order=order, label_state=LabelState.DISAGREES)) == [1, 2, 5]
    assert sorted(queue(order=order, split="test")) == [0, 1, 4, 6]
    # Category: the label when there is one (2 is predicted Shoes but labelled Bags), else the prediction (3).
    assert sorted(queue(order=order, category="Shoes")) == [0, 1, 3]
    assert sorted(queue(order=order, category="Bags")) == [2]
    assert sorted(queue(order=order, category="Hats", split="test")) == [6]
    # A confusion-matrix cell: true Shoes, predicted Bags.
    assert queue(order=order, true_category="Shoes", predicted_category="Bags") == [1]
    assert sorted(queue(order=order, predicted_category="Bags")) == [1, 5]


def test_suspected_mislabel_ranks_every_checked_label_train_split_included(queue: Queue) -> None:
    # The label check's out-of-sample quality of each label (here the factory's probabilities): 0 0.9, 1 0.05,
    # 2 0.35, 5 0.05 (a train image: ranked too, its check came from a head that never saw its label), 6 0.6.
    assert queue(order=ReviewOrder.SUSPECTED_MISLABEL) == [1, 5, 2, 6, 0, 3, 4]


def test_mislabel_scores_are_shown_and_pages_continue_into_unscored(db: Database, cat: Populated) -> None:
    first = int(cat.image_ids[0])
    page1 = review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page_size=3, page=1)
    page2 = review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page_size=3, page=2)
    assert [i.image_id - first for i in page1.items] == [1, 5, 2]
    assert [round(i.score, 6) for i in page1.items] == [0.05, 0.05, 0.35]  # type: ignore[arg-type]
    assert [i.image_id - first for i in page2.items] == [6, 0, 3]
    assert page2.items[2].score is None  # image 3 cannot be scored (unlabelled)
    assert (page1.total, page1.pages) == (7, 3)


def test_each_suspect_says_which_label_it_probably_should_have(db: Database, cat: Populated) -> None:
    first = int(cat.image_ids[0])
    shoes_as_bags, hats_as_bags, right = review_items(db, [first + 1, first + 5, first])
    assert shoes_as_bags.suggestion is not None and shoes_as_bags.suggestion.category == "Bags"
    assert shoes_as_bags.suggestion.probability == pytest.approx(0.9) and shoes_as_bags.suggests_change
    assert hats_as_bags.suggests_change and hats_as_bags.suggestion.category == "Bags"  # type: ignore[union-attr]
    assert right.suggestion is not None and not right.suggests_change
    issues = review_queue(db, label_state=LabelState.LABEL_ISSUES, order=ReviewOrder.SUSPECTED_MISLABEL).items
    assert [i.image_id - first for i in issues] == [1, 5]  # the two confident contradictions, not the unsure ones


def test_a_label_changed_since_the_check_is_no_longer_a_suspect(db: Database, cat: Populated) -> None:
    first = int(cat.image_ids[0])
    set_label(db, first + 1, "Bags", actor="alice")  # a person took the suggestion
    ranked = review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page_size=50).items
    assert [i.image_id - first for i in ranked][:4] == [5, 2, 6, 0]
    relabelled = next(i for i in ranked if i.image_id == first + 1)
    assert relabelled.score is None and relabelled.suggestion is None
    assert first + 1 not in [i.image_id for i in review_queue(db, label_state="label-issues").items]


def test_most_unusual_puts_the_highest_outlier_score_first(queue: Queue) -> None:
    # The factory's outlier stand-in is 1 - confidence: image 3 (0.34) is the least like anything, 4 has none.
    assert queue(order=ReviewOrder.MOST_UNUSUAL) == [3, 2, 6, 5, 0, 1, 4]


def test_pagination_totals_and_a_page_past_the_end(db: Database, cat: Populated) -> None:
    first = int(cat.image_ids[0])
    page = review_queue(db, order=ReviewOrder.LOWEST_CONFIDENCE, page_size=2, page=2)
    assert (page.total, page.pages, page.page) == (7, 4, 2)
    assert [i.image_id - first for i in page.items] == [6, 5]
    last = review_queue(db, order=ReviewOrder.LOWEST_CONFIDENCE, page_size=2, page=99)
    assert last.page == 4 and [i.image_id - first for i in last.items] == [4]
    with pytest.raises(ProdcatError, match="page 0"):
        review_queue(db, page=0)
    with pytest.raises(ProdcatError, match="page size"):
        review_queue(db, page_size=0)


def test_items_carry_what_the_grid_shows(db: Database, cat: Populated) -> None:
    first = int(cat.image_ids[0])
    item = review_queue(db, order=ReviewOrder.LOWEST_CONFIDENCE, true_category="Shoes", predicted_category="Bags")
    (one,) = item.items
    assert one.image_id == first + 1 and one.label == "Shoes" and one.predicted == "Bags" and one.disagrees
    assert one.split == "test" and one.original_name == "img_001.jpg"
    assert one.thumb_path.is_absolute() and one.thumb_path.is_file()
    assert [name for name, _ in one.top3] == ["Bags", "Shoes", "Hats"]
    assert one.top3[0][1] == pytest.approx(0.9) and one.confidence == pytest.approx(0.9)
    assert one.model_version_id == cat.version_id and one.predicted_category_id == cat.id_of("Bags")
    unpredicted = review_queue(db, order=ReviewOrder.NEWEST, split="test", label_state="unlabelled").items[0]
    assert unpredicted.predicted is None and unpredicted.top3 == [] and unpredicted.score is None


def test_review_items_of_an_upload_batch_keep_its_order(db: Database, cat: Populated) -> None:
    first = int(cat.image_ids[0])
    # What the upload page asks for: the batch's ids, in upload order, an id repeated and one since deleted.
    items = review_items(db, [first + 6, first + 1, first + 4, first + 1, 999_999])
    assert [i.image_id for i in items] == [first + 6, first + 1, first + 4]
    hats, shoes, unpredicted = items
    assert (hats.label, hats.predicted, hats.confidence) == ("Hats", "Hats", pytest.approx(0.6))
    assert shoes.predicted == "Bags" and shoes.disagrees and shoes.model_version_id == cat.version_id
    assert shoes.top3[0] == ("Bags", pytest.approx(0.9)) and shoes.thumb_path.is_file()
    assert unpredicted.label is None and unpredicted.predicted is None and unpredicted.model_version_id is None
    assert review_items(db, [first], version_id=cat.version_id)[0].predicted == "Shoes"
    assert review_items(db, []) == []
    with pytest.raises(NotFound, match="no model version 12345"):
        review_items(db, [first], version_id=12345)


def test_merged_class_counts_as_its_target(db: Database, cat: Populated, queue: Queue) -> None:
    merge_categories(db, "Bags", "Shoes", actor="alice")
    # "Bags" predictions now mean "Shoes": image 1 (labelled Shoes) agrees, image 2 moved to Shoes and agrees.
    assert sorted(queue(order=ReviewOrder.NEWEST, label_state=LabelState.DISAGREES)) == [5]
    first = int(cat.image_ids[0])
    item = next(i for i in review_queue(db, order=ReviewOrder.NEWEST).items if i.image_id == first + 5)
    assert item.predicted == "Shoes" and item.top3[0] == ("Shoes", pytest.approx(0.95))


def test_without_a_model_everything_is_unpredicted_and_newest_first(db: Database) -> None:
    info = build(db, CATALOGUE, with_version=False)
    first = int(info.image_ids[0])
    page = review_queue(db, order=ReviewOrder.LOWEST_CONFIDENCE)
    assert page.version_id is None and page.total == 7
    # Nothing to rank by: the newest uploads first (image 2 was uploaded days after the others), in every order.
    assert [i.image_id - first for i in page.items] == [2, 6, 5, 4, 3, 1, 0]
    for order in ReviewOrder:
        assert [i.image_id - first for i in review_queue(db, order=order).items] == [2, 6, 5, 4, 3, 1, 0], order
    assert [i.image_id - first for i in review_queue(db, page=2, page_size=3).items] == [4, 3, 1]
    assert all(i.predicted is None for i in page.items)
    assert review_queue(db, label_state=LabelState.DISAGREES).total == 0
    assert review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL).total == 7


def test_empty_database(db: Database) -> None:
    page = review_queue(db)
    assert (page.items, page.total, page.page, page.pages) == ([], 0, 1, 1)


def test_bad_arguments_are_refused_with_the_value(db: Database, cat: Populated) -> None:
    with pytest.raises(ProdcatError, match="unknown review order 'best'"):
        review_queue(db, order="best")
    with pytest.raises(ProdcatError, match="unknown split 'dev'"):
        review_queue(db, split="dev")
    with pytest.raises(NotFound, match="Socks"):
        review_queue(db, category="Socks")
    with pytest.raises(NotFound, match="model version 99"):
        review_queue(db, version_id=99)


def test_random_catalogue_agrees_with_numpy(db: Database) -> None:
    info = populate(db, n_images=1500, predicted_fraction=0.9, seed=3)
    has_pred = info.predicted >= 0
    page = review_queue(db, order=ReviewOrder.LOWEST_CONFIDENCE, page_size=30)
    expected = info.image_ids[has_pred][np.lexsort((info.image_ids[has_pred], info.confidence[has_pred]))][:30]
    assert [i.image_id for i in page.items] == expected.tolist()
    labelled = info.labels >= 0
    disagree = labelled & has_pred & (info.labels != info.predicted)
    assert review_queue(db, label_state=LabelState.DISAGREES).total == int(disagree.sum())
    assert review_queue(db, label_state=LabelState.UNLABELLED, split="val").total == int(
        (~labelled & (info.splits == "val")).sum()
    )
    shoes = info.id_of("Shoes")
    by_category = np.where(labelled, info.labels == shoes, info.predicted == shoes)
    assert review_queue(db, category="Shoes").total == int(by_category.sum())
    last = review_queue(db, order=ReviewOrder.HIGHEST_ENTROPY, page_size=30, page=10_000)
    assert last.items[-1].predicted is None  # unpredicted images come last
    mislabel = review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page_size=10).items
    scores = [i.score for i in mislabel]
    assert all(i.label is not None and i.score is not None for i in mislabel)
    assert scores == sorted(scores)  # type: ignore[type-var]
    assert {i.split for i in review_queue(db, order=ReviewOrder.SUSPECTED_MISLABEL, page_size=100).items} == {
        "train",
        "val",
        "test",
    }


def test_review_command_prints_the_queue(db: Database, cat: Populated) -> None:
    from core.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["review", "--order", "suspected-mislabel", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total"] == 7 and [i["file"] for i in data["items"]] == ["img_001.jpg", "img_005.jpg"]
    assert data["items"][0]["label"] == "Shoes" and data["items"][0]["predicted"] == "Bags"
    assert data["items"][0]["suggested"] == "Bags" and data["items"][0]["label_issue"] is True
    assert data["label_health"]["open_issues"] == 2 and data["label_health"]["checked"] == 5
    table = runner.invoke(app, ["review", "--order", "suspected-mislabel", "--limit", "2"])
    assert "2 likely label errors still open among 5 checked labels" in table.stdout
    assert "Bags (90%)" in table.stdout
    text = runner.invoke(app, ["review", "--category", "Shoes", "--label-state", "unlabelled"])
    assert text.exit_code == 0 and "img_003.jpg" in text.stdout and "1 images match" in text.stdout
    bad = runner.invoke(app, ["review", "--category", "Socks"])
    assert bad.exit_code == 1 and "Socks" in bad.output


def test_search_finds_an_image_by_id_or_by_part_of_its_file_name(db: Database, cat: Populated, queue: Queue) -> None:
    from sqlalchemy import update

    from core.schema import Image

    first = int(cat.image_ids[0])
    renamed = {2: "Red_Sneaker_2024.JPG", 5: "sneaker-blue.png", 6: "hat 50%_off.jpg"}
    with db.write() as session:
        for index, name in renamed.items():
            session.execute(update(Image).where(Image.id == first + index).values(original_name=name))
    assert queue(search="sneaker") == [2, 5]  # any case, still in the queue's order
    assert queue(search="  SNEAKER ", label_state=LabelState.LABELLED, split="train") == [5]
    assert queue(search="%") == [6] and queue(search="0%_") == [6]  # wildcards are literal
    assert queue(search=f"#{first + 4}") == [4]
    # A bare number is an id or a name containing it: id first+3, and whichever file names hold those digits.
    number = str(first + 3)
    expected = {3} | {k for k in range(7) if number in renamed.get(k, f"img_{k:03d}.jpg")}
    assert sorted(queue(search=number)) == sorted(expected) and 3 in expected
    assert queue(search="no such photo") == [] and len(queue(search="  ")) == 7
    page = review_queue(db, search="sneaker", page_size=1)
    assert (page.total, page.pages) == (2, 2)

    from core.cli.app import app

    result = CliRunner().invoke(app, ["review", "--search", "Sneaker", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(i["file"] for i in json.loads(result.stdout)["items"]) == ["Red_Sneaker_2024.JPG", "sneaker-blue.png"]
