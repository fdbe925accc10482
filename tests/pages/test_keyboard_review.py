"""Keyboard review (issue 11): keys pinned to categories (the team's PRODCAT_REVIEW_KEYS, and per session under
Change keys; a taken key refused), the same keys on every photo even when a category is added, a new category typed
in, and skip recorded (a skipped photo is set aside, and says when it was skipped when it comes back). AppTest."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.catalog.labels import audit_trail
from core.db import Database, open_database
from core.settings import Settings, get_settings
from tests.core.factories import FakeImage, build
from tests.pages.helpers import card_ids, errors_of, plain, run_page, type_new_option

BAGS = (0.1, 0.8, 0.1)


def _keyboard(at: AppTest) -> AppTest:
    return at.toggle(key="review_keyboard").set_value(True).run()


def _keys_of(at: AppTest, image_id: int) -> dict[str, str]:
    """key -> category name on the keyboard card of this photo."""
    prefix = f"kb_pick_{image_id}_"
    return {
        b.key[len(prefix) :]: b.label.replace("\\", "").split(" (")[0]
        for b in at.button
        if b.key and b.key.startswith(prefix)
    }


def test_keyboard_review_takes_a_new_category_typed_and_keeps_the_other_keys(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label=None, name=f"p{k}.jpg") for k in range(2)])
    first, second = (int(i) for i in made.image_ids)
    at = _keyboard(run_page("pages/review.py", session={"signed_in_account": "lee"}))
    before = _keys_of(at, first)
    assert before == {"1": "Bags", "2": "Hats", "3": "Shoes"}
    type_new_option(at.selectbox(key=f"kb_other_{first}"), "Belts")  # sorts between Bags and Hats
    at.run()

    assert not at.exception and errors_of(at) == []
    assert audit_trail(db, first)[0].new_category == "Belts"
    # The next photo: the keys learnt so far mean what they meant; the new category takes a free key.
    assert _keys_of(at, second) == {**before, "4": "Belts"}


# --- keys pinned to categories -----------------------------------------------------------------------------------


def _with_review_keys(monkeypatch: pytest.MonkeyPatch, value: str) -> Database:
    """The database of settings with PRODCAT_REVIEW_KEYS (one opened earlier keeps its settings)."""
    monkeypatch.setenv("PRODCAT_REVIEW_KEYS", value)
    get_settings.cache_clear()
    return open_database(get_settings())


def test_keys_pinned_by_the_team_setting_hold_on_every_photo(data_dir: object, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _with_review_keys(monkeypatch, "shoes=s, Bags=B")
    made = build(db, [FakeImage(split="train", label=None, probs=BAGS, name=f"p{k}.jpg") for k in range(2)])
    first, second = (int(i) for i in made.image_ids)
    at = _keyboard(run_page("pages/review.py", session={"signed_in_account": "lee"}))
    assert _keys_of(at, first) == {"1": "Hats", "b": "Bags", "s": "Shoes"}
    assert any("Keys: 1 Hats · B Bags · S Shoes" in c for c in plain(at.caption))
    at.button(key=f"kb_pick_{first}_s").click().run()
    assert audit_trail(db, first)[0].new_category == "Shoes"
    assert _keys_of(at, second) == {"1": "Hats", "b": "Bags", "s": "Shoes"}


def test_a_person_pins_a_key_for_the_session_and_a_taken_key_is_refused(
    data_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _with_review_keys(monkeypatch, "Shoes=s")
    made = build(db, [FakeImage(split="train", label=None, name=f"p{k}.jpg") for k in range(2)])
    first, second = (int(i) for i in made.image_ids)
    at = _keyboard(run_page("pages/review.py", session={"signed_in_account": "lee"}))
    assert _keys_of(at, first) == {"1": "Bags", "2": "Hats", "s": "Shoes"}

    at.selectbox(key="kb_pin_category").set_value("Hats")
    at.selectbox(key="kb_pin_key").set_value("s")
    at.button(key="kb_pin").click().run()
    assert any("S is pinned to Shoes: unpin it first" in e for e in plain(at.error))
    assert _keys_of(at, first) == {"1": "Bags", "2": "Hats", "s": "Shoes"}  # nothing changed

    at.selectbox(key="kb_pin_category").set_value("Hats")
    at.selectbox(key="kb_pin_key").set_value("1")  # Bags's key until now: Bags takes a free one
    at.button(key="kb_pin").click().run()
    assert errors_of(at) == []
    assert _keys_of(at, first) == {"1": "Hats", "2": "Bags", "s": "Shoes"}
    at.button(key=f"kb_pick_{first}_1").click().run()
    assert audit_trail(db, first)[0].new_category == "Hats"
    assert _keys_of(at, second) == {"1": "Hats", "2": "Bags", "s": "Shoes"}

    at.button(key="kb_unpin_s").click().run()  # Shoes keeps S (keys shown stay) but S may now be pinned elsewhere
    at.selectbox(key="kb_pin_category").set_value("Bags")
    at.selectbox(key="kb_pin_key").set_value("s")
    at.button(key="kb_pin").click().run()
    assert errors_of(at) == []
    assert _keys_of(at, second) == {"1": "Hats", "2": "Shoes", "s": "Bags"}


def test_a_review_keys_setting_with_a_key_given_twice_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODCAT_REVIEW_KEYS", "Shoes=s,Socks=S")
    with pytest.raises(ValueError, match="'s' is given to both 'Shoes' and 'Socks'"):
        Settings()
    monkeypatch.setenv("PRODCAT_REVIEW_KEYS", "Shoes=c")
    with pytest.raises(ValueError, match="other than c, r and u"):
        Settings()


# --- skip --------------------------------------------------------------------------------------------------------


def test_a_skipped_photo_is_set_aside_until_asked_for_and_then_says_when_it_was_skipped(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label=None, name=f"p{k}.jpg") for k in range(3)])
    ids = [int(i) for i in made.image_ids]
    at = _keyboard(run_page("pages/review.py", session={"signed_in_account": "lee"}))
    skipped = card_ids(at)[0]
    at.button(key=f"kb_skip_{skipped}").click().run()
    rest = [i for i in ids if i != skipped]
    assert card_ids(at)[0] == rest[0]
    assert [(r.action, r.actor, r.new_category) for r in audit_trail(db, skipped)] == [("skip", "lee", None)]
    at.run()  # the whole page again: the skipped photo does not come first again
    assert card_ids(at)[0] == rest[0]
    assert any("0 photos labelled, 0 kept as labelled, 1 skipped" in c for c in plain(at.caption))

    for image_id in rest:
        at.button(key=f"kb_pick_{image_id}_1").click().run()
    assert card_ids(at) == []
    assert any("Every photo on this page is done but the 1 you skipped" in i for i in plain(at.info))
    at.button(key="kb_again").click().run()
    assert card_ids(at)[0] == skipped
    assert any(c.startswith("You skipped this photo at ") for c in plain(at.caption))
    at.button(key=f"kb_pick_{skipped}_1").click().run()
    assert [i.value for i in at.info] == [
        "Every photo on this page is done: go to the next page (below), or change the filters."
    ]
    assert any("3 photos labelled, 0 kept as labelled, 0 skipped" in c for c in plain(at.caption))


def test_undo_after_a_skip_takes_back_the_label_given_before_it(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label=None, name=f"p{k}.jpg") for k in range(2)])
    first, second = (int(i) for i in made.image_ids)
    at = _keyboard(run_page("pages/review.py", session={"signed_in_account": "lee"}))
    at.button(key=f"kb_pick_{first}_1").click().run()  # Bags
    at.button(key=f"kb_skip_{second}").click().run()
    next(b for b in at.button if b.label == "Undo my last change").click().run()

    assert not at.exception and errors_of(at) == []
    assert [(r.action, r.new_category) for r in audit_trail(db, first)] == [("undo", None), ("set", "Bags")]
    assert [(r.action, r.actor) for r in audit_trail(db, second)] == [("skip", "lee")]  # kept, never undone
    assert card_ids(at)[0] == first  # the undone photo comes back to be labelled
