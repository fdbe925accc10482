"""The review page keeps what a person set up, pages agree, undo stays in its own session (AppTest, real database)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from streamlit.testing.v1 import AppTest

from core.catalog.labels import audit_trail
from core.db import Database
from core.settings import get_settings
from tests.core.factories import BASE_TIME, FakeImage, build
from tests.pages.helpers import card_ids, errors_of, run_page

BAGS, HATS = (0.1, 0.8, 0.1), (0.1, 0.1, 0.8)


def _apply_filters(at: AppTest, **values: str) -> AppTest:
    for key, value in values.items():
        at.selectbox(key=f"review_{key}").set_value(value)
    return next(b for b in at.button if b.label == "Apply filters").click().run()


def _page_line(at: AppTest) -> str:
    return next(t.value for t in at.text if " images match; page " in t.value)


def _alternating(db: Database, n: int) -> list[int]:
    """`n` images without predictions, every second one labelled; returns the ids (the queue shows them by id)."""
    made = build(db, [FakeImage(split="train", label="Shoes" if k % 2 else None) for k in range(n)])
    return [int(i) for i in made.image_ids]


def test_filters_page_and_keyboard_mode_survive_a_visit_to_another_page(db: Database) -> None:
    ids = _alternating(db, 60)
    unlabelled = ids[0::2]  # 30: two pages of 24
    at = run_page("pages/review.py")
    _apply_filters(at, state="unlabelled", split="train")
    at.pagination(key="review_page").set_value(2).run()
    assert card_ids(at) == unlabelled[24:]
    at.toggle(key="review_keyboard").set_value(True).run()

    at.switch_page("pages/home.py").run()
    assert not at.exception and not at.toggle
    at.switch_page("pages/review.py").run()

    assert not at.exception and errors_of(at) == []
    assert at.selectbox(key="review_state").value == "unlabelled" and at.selectbox(key="review_split").value == "train"
    assert at.toggle(key="review_keyboard").value is True
    assert at.pagination(key="review_page").value == 2
    assert _page_line(at) == "30 images match; page 2 of 2"
    assert card_ids(at) == [unlabelled[24]]  # keyboard review shows the first photo of the page (and no grid)


def test_a_filter_change_starts_at_page_one_and_the_highlighted_page_is_the_one_shown(db: Database) -> None:
    ids = _alternating(db, 100)  # all: 5 pages; unlabelled: 50 (3 pages); labelled: 50
    at = run_page("pages/review.py")
    at.pagination(key="review_page").set_value(4).run()
    assert card_ids(at) == ids[72:96]

    _apply_filters(at, state="unlabelled")
    assert _page_line(at) == "50 images match; page 1 of 3"
    assert at.pagination(key="review_page").value == 1
    assert card_ids(at) == ids[0::2][:24]

    # On the last page, labelling its two photos leaves two pages: the grid and the pagination both show page 2.
    at.pagination(key="review_page").set_value(3).run()
    last = card_ids(at)
    assert last == ids[0::2][48:]
    for image_id in last:
        at.checkbox(key=f"rv_sel_{image_id}").check()
    at.selectbox(key="review_bulk_target").set_value("Hats")
    next(b for b in at.button if b.label == "Relabel selected").click().run()
    assert _page_line(at) == "48 images match; page 2 of 2"
    assert at.pagination(key="review_page").value == 2
    assert card_ids(at) == ids[0::2][24:48]


def test_undo_takes_back_only_this_sessions_changes_when_everyone_is_called_staff(db: Database) -> None:
    made = build(
        db,
        [
            FakeImage(split="train", label=None, probs=BAGS, name="tote.jpg"),
            FakeImage(split="train", label=None, probs=HATS, name="cap.jpg"),
        ],
    )
    tote, cap = (int(i) for i in made.image_ids)
    staff = get_settings().default_actor
    a = run_page("pages/review.py")  # two people in two browsers, both keeping the default name
    b = run_page("pages/review.py")
    a.button(key=f"rv_accept_{tote}").click().run()
    assert audit_trail(db, tote)[0].actor == staff

    undo = next(x for x in b.button if x.label == "Undo my last change")
    undo.click().run()
    assert any("Nothing of yours to undo in this session" in w.value for w in b.warning)
    assert [r.action for r in audit_trail(db, tote)] == ["set"]  # A's label stands

    b.pills(key=f"rv_pick_{cap}_None").set_value("Shoes").run()
    next(x for x in a.button if x.label == "Undo my last change").click().run()  # A's own change, not B's newer one
    assert [r.action for r in audit_trail(db, tote)] == ["undo", "set"]
    assert [r.action for r in audit_trail(db, cap)] == ["set"]
    next(x for x in b.button if x.label == "Undo my last change").click().run()
    assert [r.action for r in audit_trail(db, cap)] == ["undo", "set"]
    assert not a.exception and not b.exception


def test_b10_keyboard_keys_are_fixed_per_category_and_every_category_is_reachable(db: Database) -> None:
    names = ["Bags", "Belts", "Caps", "Coats", "Dresses", "Gloves", "Hats", "Jeans", "Scarves", "Shoes", "Socks"]
    names.append("#sale")  # led by a symbol: it must not take the first key
    probs = [0.0] * len(names)
    probs[names.index("Hats")], probs[names.index("Bags")], probs[names.index("Caps")] = 0.6, 0.3, 0.1
    other = [0.0] * len(names)
    other[names.index("Socks")], other[names.index("Belts")] = 0.7, 0.3
    made = build(
        db,
        [
            FakeImage(split="train", label=None, probs=probs, name="p0.jpg"),
            FakeImage(split="train", label="Socks", probs=other, name="p1.jpg"),
        ],
        categories=names,
    )
    first, second = (int(i) for i in made.image_ids)
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    at.toggle(key="review_keyboard").set_value(True).run()

    def keys_of(image_id: int) -> dict[str, str]:
        """key -> category name on the keyboard card of this photo."""
        prefix = f"kb_pick_{image_id}_"
        return {
            b.key[len(prefix) :]: b.label.replace("\\", "").split(" (")[0]
            for b in at.button
            if b.key and b.key.startswith(prefix)
        }

    on_first = keys_of(first)
    assert on_first["1"] == "Bags" and on_first["2"] == "Belts" and on_first["0"] == "Shoes"  # by name, not by model
    assert on_first["a"] == "Socks" and on_first["b"] == "#sale"  # symbol-led names come last
    assert set(on_first.values()) == set(names)  # every category has a key here (12 < 33 keys)
    assert any("Keys: 1 Bags · 2 Belts" in c.value.replace("\\", "") for c in at.caption)  # the legend

    at.button(key=f"kb_pick_{first}_a").click().run()  # "A": Socks
    assert not at.exception and errors_of(at) == []
    [event] = audit_trail(db, first)
    assert (event.actor, event.new_category) == ("lee", "Socks")
    assert keys_of(second) == on_first  # the same keys on the next photo, whatever the model thinks of it
    # Its current label is reachable (key A, highlighted), and Enter keeps it.
    assert at.button(key=f"kb_pick_{second}_a").proto.type == "primary"
    keep = at.button(key=f"kb_confirm_{second}")
    assert keep.label.replace("\\", "") == "Keep Socks"
    keep.click().run()
    # "Confirmed by a person" is in the audit trail (newest first), and the label is unchanged.
    newest = audit_trail(db, second)[0]
    assert (newest.action, newest.actor, newest.new_category) == ("confirm", "lee", "Socks")
    assert [e.action for e in audit_trail(db, second)] == ["confirm", "import"]  # nothing overwritten
    assert any("Every photo on this page is done" in i.value for i in at.info)
    assert any("1 photo labelled, 1 kept as labelled, 0 skipped" in c.value.replace("\\", "") for c in at.caption)

    # Undo brings the labelled photo back: the change counts as this session's.
    next(b for b in at.button if b.label == "Undo my last change").click().run()
    assert audit_trail(db, first)[0].action == "undo"
    assert at.session_state["review_keyboard_done"] == [second]  # the first photo is to do again


def test_keyboard_review_offers_categories_beyond_the_keys_in_a_picker(db: Database) -> None:
    names = [f"Category {n:02d}" for n in range(40)]  # more than the 33 keys
    made = build(db, [FakeImage(split="train", label="Category 39", name="p.jpg")], categories=names)
    image = int(made.image_ids[0])
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    at.toggle(key="review_keyboard").set_value(True).run()
    keyed = [b for b in at.button if b.key and b.key.startswith(f"kb_pick_{image}_")]
    assert len(keyed) == 34  # 33 keys, plus the photo's own label without a key
    assert at.button(key=f"kb_pick_{image}_label").label.startswith("Category 39")
    other = at.selectbox(key=f"kb_other_{image}")
    assert other.options == [f"Category {n}" for n in range(33, 39)]
    other.set_value("Category 35").run()
    assert audit_trail(db, image)[0].new_category == "Category 35"


def test_keyboard_skip_is_recorded_in_the_session_and_the_next_photos_are_prefetched(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label=None, name=f"p{k}.jpg") for k in range(5)])
    ids = [int(i) for i in made.image_ids]
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    at.toggle(key="review_keyboard").set_value(True).run()
    current = card_ids(at)[0]
    assert len(at.get("image")) == 4  # the photo, and the next ones drawn small so the browser has them already
    at.button(key=f"kb_skip_{current}").click().run()
    # Skipping changes no label, but the audit trail records who set the photo aside (and the session notes it).
    assert [(r.action, r.actor, r.old_category, r.new_category) for r in audit_trail(db, current)] == [
        ("skip", "lee", None, None)
    ]
    noted = [c.value.replace("\\", "") for c in at.caption]
    assert any("0 photos labelled, 0 kept as labelled, 1 skipped" in c for c in noted)
    assert card_ids(at)[0] != current and card_ids(at)[0] in ids


def test_ticks_are_cleared_after_a_bulk_relabel_and_stay_cleared_after_undo(db: Database) -> None:
    ids = _alternating(db, 4)
    at = run_page("pages/review.py", session={"signed_in_account": "max"})
    for image_id in ids[:2]:
        at.checkbox(key=f"rv_sel_{image_id}").check()
    at.selectbox(key="review_bulk_target").set_value("Bags")
    next(b for b in at.button if b.label == "Relabel selected").click().run()
    assert [audit_trail(db, i)[0].new_category for i in ids[:2]] == ["Bags", "Bags"]
    assert [at.checkbox(key=f"rv_sel_{i}").value for i in ids] == [False] * 4

    next(b for b in at.button if b.label == "Undo my last change").click().run()
    assert [audit_trail(db, i)[0].action for i in ids[:2]] == ["undo", "undo"]
    assert [at.checkbox(key=f"rv_sel_{i}").value for i in ids] == [False] * 4
    # Relabel selected with nothing ticked changes nothing.
    next(b for b in at.button if b.label == "Relabel selected").click().run()
    assert any("Select some images first" in w.value for w in at.warning)
    assert [audit_trail(db, i)[0].action for i in ids[:2]] == ["undo", "undo"]


def test_without_a_model_the_newest_uploads_come_first_as_the_caption_says(db: Database) -> None:
    made = build(
        db,
        [
            FakeImage(split="train", name="old.jpg", created_at=BASE_TIME),
            FakeImage(split="train", name="newest.jpg", created_at=BASE_TIME + timedelta(days=3)),
            FakeImage(split="train", name="middle.jpg", created_at=BASE_TIME + timedelta(days=1)),
        ],
        with_version=False,
    )
    old, newest, middle = (int(i) for i in made.image_ids)
    at = run_page("pages/review.py")
    assert any("newest uploads are shown first" in c.value for c in at.caption)
    assert card_ids(at) == [newest, middle, old]
    _apply_filters(at, order="smallest-margin")  # any order: there is nothing else to rank by
    assert card_ids(at) == [newest, middle, old]


def test_accept_prediction_is_prominent_only_on_unlabelled_images(db: Database) -> None:
    made = build(
        db,
        [
            FakeImage(split="train", label=None, probs=BAGS, name="new.jpg"),
            FakeImage(split="train", label="Shoes", probs=BAGS, name="labelled.jpg"),
        ],
    )
    unlabelled, labelled = (int(i) for i in made.image_ids)
    at = run_page("pages/review.py")
    assert at.button(key=f"rv_accept_{unlabelled}").proto.type == "primary"
    assert at.button(key=f"rv_accept_{labelled}").proto.type == "secondary"


def test_the_label_check_leads_from_the_dashboard_to_the_suspects_and_one_click_takes_its_suggestion(
    db: Database,
) -> None:
    agreeing = [(0.9, 0.05, 0.05), (0.05, 0.9, 0.05), (0.05, 0.05, 0.9)]
    made = build(
        db,
        # Confidently "Bags" out of sample but labelled Shoes: likely wrong. Nine labels the check agrees with.
        [FakeImage(split="train", label="Shoes", probs=(0.02, 0.96, 0.02))]
        + [
            FakeImage(split="test", label=name, probs=agreeing[k % 3])
            for k, name in enumerate(["Shoes", "Bags", "Hats"] * 3)
        ],
    )
    suspect = int(made.image_ids[0])
    at = run_page("pages/dashboard.py")
    assert not at.exception
    assert any("1 likely label errors still open among 10 checked labels" in t.value for t in at.text)
    next(b for b in at.button if b.label == "Review the likely label errors").click().run()

    assert not at.exception and at.selectbox(key="review_state").value == "label-issues"
    assert at.selectbox(key="review_order").value == "suspected-mislabel"
    assert card_ids(at) == [suspect]
    shown = [w.value.replace("\\", "") for w in at.warning]  # markdown-escaped on the page
    assert any("likely wrong label, probably Bags (96.0%)" in text for text in shown), shown
    next(b for b in at.button if b.label == "Relabel as Bags").click().run()

    assert not at.exception and errors_of(at) == []
    assert audit_trail(db, suspect)[0].new_category == "Bags"
    # Only the card and the count line are redrawn: the card shows its new label, the count says the queue is empty.
    assert any(t.value.startswith("Label: Bags") for t in at.text)
    assert _page_line(at) == "0 images match; page 1 of 1"


@pytest.mark.both_databases
def test_a_label_changed_in_another_tab_is_not_overwritten_and_the_card_says_who_changed_it(db: Database) -> None:
    from core.catalog.labels import set_label

    made = build(db, [FakeImage(split="train", label="Shoes", probs=BAGS)])
    image_id = int(made.image_ids[0])
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    set_label(db, image_id, "Hats", actor="kim")  # another person, after lee's page was drawn
    at.pills(key=f"rv_pick_{image_id}_Shoes").set_value("Bags").run()

    assert not at.exception
    assert audit_trail(db, image_id)[0].actor == "kim"  # kim's label stands: lee's click wrote nothing
    shown = " ".join(e.value.replace("\\", "") for e in at.error)
    assert "kim" in shown and "Hats" in shown


@pytest.mark.both_databases
def test_search_and_accepting_confident_predictions_in_bulk_with_one_undo(db: Database) -> None:
    made = build(
        db,
        [FakeImage(split="train", label=None, probs=BAGS, name=f"bag_{k}.jpg") for k in range(3)]
        + [FakeImage(split="train", label=None, probs=(0.4, 0.35, 0.25), name="unsure.jpg")],
    )
    ids = [int(i) for i in made.image_ids]
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    at.text_input(key="review_search").set_value("bag_")
    next(b for b in at.button if b.label == "Apply filters").click().run()
    assert sorted(card_ids(at)) == ids[:3]

    at.toggle(key="review_accept").set_value(True).run()
    at.slider(key="review_accept_at").set_value(0.75).run()
    assert any("3" in t.value and "Bags" in t.value for t in at.text)  # the preview: 3 would become Bags
    next(b for b in at.button if b.label == "Accept 3 predictions").click().run()
    assert not at.exception and [audit_trail(db, i)[0].new_category for i in ids[:3]] == ["Bags"] * 3
    assert audit_trail(db, ids[3]) == []  # below the threshold and outside the search: untouched

    at.run()  # AppTest: the accept button's st.rerun leaves the next click unread without one more plain run
    next(b for b in at.button if b.label == "Undo my last change").click().run()
    assert all(audit_trail(db, i)[0].action == "undo" for i in ids[:3])  # one undo step took back all three


def test_search_finds_a_sku_exactly_or_by_its_beginning_and_cards_show_it_as_text(db: Database) -> None:
    from core.catalog.skus import set_sku

    made = build(db, [FakeImage(split="train", name=f"photo_{k}.jpg") for k in range(5)])
    ids = [int(i) for i in made.image_ids]
    for image_id, sku in zip(ids, ["TSH-0042-BLK", "TSH-0042-RED", "TSH-0420", "<b>BAG</b>-1"], strict=False):
        set_sku(db, [image_id], sku, actor="ada")  # ids[4] has no SKU
    at = run_page("pages/review.py")

    def search(text: str) -> list[int]:
        at.text_input(key="review_search").set_value(text)
        next(b for b in at.button if b.label == "Apply filters").click().run()
        assert not at.exception
        return sorted(card_ids(at))

    assert search("TSH-0042") == ids[:2]  # the beginning of two SKUs
    assert search("TSH-0042-RED") == [ids[1]]  # one SKU exactly
    assert "SKU: TSH-0042-RED" in [t.value for t in at.text]
    assert search("sku:TSH-0") == ids[:3]  # SKUs only
    assert search("sku:TSH-04") == [ids[2]]
    assert search("photo_3") == [ids[3]]  # file names as before
    assert "SKU: <b>BAG</b>-1" in [t.value for t in at.text]  # plain text, not HTML
    assert search("sku:photo") == []
    assert "Nothing to review with these filters." in [i.value for i in at.info]
