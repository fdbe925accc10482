"""Issue 11 in the labelling controls: a new category from a card or a bulk picker, created and applied in one go,
and deleting images (admins only, after a confirmation, with an audit row and the files removed). AppTest, real
database; keyboard review's part is in test_keyboard_review.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from core import auth
from core.catalog.labels import add_category, audit_trail, list_categories
from core.catalog.store import original_path, thumbnail_path
from core.db import Database, open_database
from core.schema import Image, ImageEvent
from core.settings import get_settings
from core.views.review import review_items
from tests.core.factories import FakeImage, build
from tests.imagegen import image_bytes
from tests.pages.helpers import card_ids, errors_of, plain, run_page, type_new_option

BAGS = (0.1, 0.8, 0.1)


def _categories(db: Database) -> list[str]:
    return [c.name for c in list_categories(db)]


# --- a new category from any labelling control -------------------------------------------------------------------


def test_a_card_creates_a_new_category_and_labels_the_photo_in_one_go(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label=None, probs=BAGS, name=f"p{k}.jpg") for k in range(2)])
    first, second = (int(i) for i in made.image_ids)
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    at.text_input(key=f"rv_new_{first}").input("Sandals")
    at.button(key=f"rv_new_go_{first}").click().run()

    assert not at.exception and errors_of(at) == []
    assert "Sandals" in _categories(db)
    [event] = audit_trail(db, first)
    assert (event.actor, event.new_category) == ("lee", "Sandals")
    assert "Sandals" in at.pills(key=f"rv_pick_{second}_None").options  # every card can use it now

    # A typed name that is an existing category in other case is that category, not an error or a second one.
    at.text_input(key=f"rv_new_{second}").input("  shoes ")
    at.button(key=f"rv_new_go_{second}").click().run()
    assert errors_of(at) == [] and audit_trail(db, second)[0].new_category == "Shoes"
    assert sorted(_categories(db)) == ["Bags", "Hats", "Sandals", "Shoes"]


def test_the_review_bulk_picker_takes_a_new_category_for_the_selected_photos(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label=None, name=f"p{k}.jpg") for k in range(3)])
    ids = [int(i) for i in made.image_ids]
    at = run_page("pages/review.py", session={"signed_in_account": "lee"})
    for image_id in ids[:2]:
        at.checkbox(key=f"rv_sel_{image_id}").check()
    type_new_option(at.selectbox(key="review_bulk_target"), "Sandals")
    next(b for b in at.button if b.label == "Relabel selected").click().run()

    assert not at.exception and errors_of(at) == []
    assert [audit_trail(db, i)[0].new_category for i in ids[:2]] == ["Sandals", "Sandals"]
    assert audit_trail(db, ids[2]) == []
    assert "Sandals" in at.selectbox(key="review_bulk_target").options


def test_the_upload_bulk_picker_takes_an_existing_category_typed_in_other_case(db: Database) -> None:
    add_category(db, "Hats", actor="setup")
    at = run_page("pages/upload.py", session={"signed_in_account": "gus"})
    at.file_uploader[0].set_value([("new.png", image_bytes("Hats", 2), "image/png")])
    next(b for b in at.button if b.label == "Import").click().run()
    type_new_option(at.selectbox(key="upload_target"), "hats")
    at.run()  # the Apply button is enabled once a category is chosen
    type_new_option(at.selectbox(key="upload_target"), "hats")
    at.button(key="upload_apply").click().run()

    assert not at.exception and errors_of(at) == []
    assert audit_trail(db, card_ids(at)[0])[0].new_category == "Hats"
    assert _categories(db) == ["Hats"]


# --- deleting images ---------------------------------------------------------------------------------------------


def _events(db: Database) -> list[tuple[int, str, str, str, str]]:
    """(image id, action, actor, file name, note) of every image event."""
    columns = (ImageEvent.image_id, ImageEvent.action, ImageEvent.actor, ImageEvent.original_name, ImageEvent.note)
    with db.read() as session:
        rows = session.execute(select(*columns).order_by(ImageEvent.id))
        return [(image_id, action, actor, name, note) for image_id, action, actor, name, note in rows]


def test_an_admin_deletes_a_photo_from_its_card_after_confirming(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label="Bags", name="blurry.jpg"), FakeImage(split="train")])
    gone, kept = (int(i) for i in made.image_ids)
    with db.read() as session:
        row = session.get(Image, gone)
        assert row is not None
        files = [original_path(db.settings, row), thumbnail_path(db.settings, row)]
    assert all(f.is_file() for f in files)
    at = run_page("pages/review.py", session={"signed_in_account": "ada"})
    at.text_input(key=f"rv_delete_reason_{gone}").input("out of focus")
    at.button(key=f"rv_delete_{gone}").click().run()

    assert not at.exception and errors_of(at) == []
    assert [i.image_id for i in review_items(db, [gone, kept])] == [kept]
    [(image_id, action, actor, name, note)] = _events(db)
    assert (image_id, action, actor, name) == (gone, "delete", "ada", "blurry.jpg")
    assert "out of focus" in note and "'Bags'" in note
    assert not any(f.exists() for f in files)  # no other row names them
    assert card_ids(at) == [kept]
    assert any(s.startswith(f"Deleted #{gone} blurry.jpg (out of focus)") for s in plain(at.success))


def test_an_admin_deletes_the_selected_photos(db: Database) -> None:
    made = build(db, [FakeImage(split="train", name=f"p{k}.jpg") for k in range(3)])
    ids = [int(i) for i in made.image_ids]
    at = run_page("pages/review.py", session={"signed_in_account": "ada"})
    for image_id in ids[:2]:
        at.checkbox(key=f"rv_sel_{image_id}").check()
    at.button(key="review_delete_selected").click().run()

    assert not at.exception and errors_of(at) == []
    assert [i.image_id for i in review_items(db, ids)] == ids[2:]
    assert sorted(e[0] for e in _events(db)) == ids[:2]
    assert card_ids(at) == ids[2:]


@pytest.fixture
def accounts(data_dir: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    monkeypatch.setenv("PRODCAT_AUTH", "builtin")
    get_settings.cache_clear()
    db = open_database(get_settings())
    auth.add_account(db, "ada", "admin", "correct horse battery", actor="")
    auth.add_account(db, "lea", "labeller", "correct horse battery", actor="ada")
    yield db


def test_a_labeller_sees_no_delete_and_an_admin_does(accounts: Database) -> None:
    image_id = int(build(accounts, [FakeImage(split="train")]).image_ids[0])
    labeller = run_page("pages/review.py", session={"signed_in_account": "lea"})
    assert not labeller.exception
    assert card_ids(labeller) == [image_id]
    assert not [b for b in labeller.button if b.key and "delete" in b.key]
    assert not [t for t in labeller.text_input if t.key and "delete" in t.key]
    admin = run_page("pages/review.py", session={"signed_in_account": "ada"})
    assert {b.key for b in admin.button if b.key and "delete" in b.key} == {
        f"rv_delete_{image_id}",
        "review_delete_selected",
    }
