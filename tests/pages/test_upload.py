"""The upload page: import with a category, refused and duplicate files reported, one-click labelling (AppTest)."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

import core.catalog.ingest.importer as importer
from core.catalog.ingest import ImportedItem, ImportResult, RefusedItem, Upload
from core.catalog.labels import add_category, audit_trail
from core.catalog.stats import catalogue_stats
from core.db import Database
from pages._upload_batch import Batch
from tests.imagegen import image_bytes
from tests.pages.helpers import card_ids, errors_of, run_page


def _import(at: AppTest, files: list[tuple[str, bytes, str]], category: str | None = None) -> AppTest:
    at.file_uploader[0].set_value(files)
    if category is not None:
        at.selectbox[0].set_value(category)
    next(b for b in at.button if b.label == "Import").click().run()
    return at


def test_upload_with_a_category_labels_every_image_and_reports_refusals(db: Database) -> None:
    files = [(f"shoe_{k}.png", image_bytes("Shoes", k), "image/png") for k in range(3)]
    files.append(("notes.txt", b"not an image at all", "text/plain"))
    add_category(db, "Shoes", actor="setup")  # AppTest's selectbox cannot type a new name (the browser test does)
    at = run_page("pages/upload.py", session={"signed_in_account": "erin"})
    _import(at, files, category="Shoes")

    assert not at.exception and errors_of(at) == []
    stats = catalogue_stats(db)
    assert (stats.total_images, stats.labelled) == (3, 3)
    assert any("3 imported" in t.value and "1 refused" in t.value for t in at.text)
    refused = at.dataframe[0].value
    assert list(refused["file"]) == ["notes.txt"] and refused["reason"][0]
    shown = card_ids(at)
    assert len(shown) == 3
    assert audit_trail(db, shown[0])[0].actor == "erin"


def test_duplicates_name_the_image_they_match_and_one_click_labels(db: Database) -> None:
    for name in ("Bags", "Hats"):
        add_category(db, name, actor="setup")
    at = run_page("pages/upload.py", session={"signed_in_account": "finn"})
    _import(at, [("bag.png", image_bytes("Bags", 1), "image/png")], category="Bags")
    _import(at, [("hat.png", image_bytes("Hats", 1), "image/png")], category="Hats")
    first = catalogue_stats(db).total_images
    # The same bag again under another name, plus a new unlabelled photo.
    again = [("bag-copy.png", image_bytes("Bags", 1), "image/png"), ("new.png", image_bytes("Hats", 2), "image/png")]
    _import(at, again)

    assert catalogue_stats(db).total_images == first + 1
    duplicates = at.dataframe[0].value
    assert list(duplicates["file"]) == ["bag-copy.png"] and list(duplicates["its name"]) == ["bag.png"]
    new_id = max(card_ids(at))
    at.pills(key=f"up_pick_{new_id}_None").set_value("Hats").run()
    assert audit_trail(db, new_id)[0].new_category == "Hats"
    assert audit_trail(db, new_id)[0].actor == "finn"


def test_apply_to_the_whole_upload_needs_a_category_and_leaves_labelled_duplicates_alone(db: Database) -> None:
    for name in ("Bags", "Hats"):
        add_category(db, name, actor="setup")
    at = run_page("pages/upload.py", session={"signed_in_account": "gus"})
    _import(at, [("bag.png", image_bytes("Bags", 1), "image/png")], category="Bags")
    bag = card_ids(at)[0]
    # The labelled bag again (a duplicate) with two new photos, nothing ticked.
    again = [("bag-copy.png", image_bytes("Bags", 1), "image/png")]
    again += [(f"new{k}.png", image_bytes("Hats", k), "image/png") for k in (2, 3)]
    _import(at, again)
    new = [i for i in card_ids(at) if i != bag]
    assert len(new) == 2 and bag in card_ids(at)

    target, apply = at.selectbox(key="upload_target"), at.button(key="upload_apply")
    assert target.value is None and target.placeholder == "choose a category"
    assert apply.label == "Apply to all 2 photos" and apply.proto.disabled  # no category yet: nothing to apply
    assert any(c.value.startswith("1 duplicate already labelled is left out") for c in at.caption)

    target.set_value("Hats").run()
    at.button(key="upload_apply").click().run()
    assert not at.exception and errors_of(at) == []
    assert [audit_trail(db, i)[0].new_category for i in new] == ["Hats", "Hats"]
    assert [r.new_category for r in audit_trail(db, bag)] == ["Bags"]  # the catalogue's label stands
    shown = [s.value.replace("\\", "") for s in at.success]  # the page escapes Markdown punctuation
    assert "2 photos labelled Hats; 1 duplicate already labelled was left alone" in shown

    # Ticking the duplicate relabels it on purpose; the tick and the category are gone afterwards.
    at.checkbox(key=f"up_sel_{bag}").check().run()
    assert at.button(key="upload_apply").label == "Apply to 1 selected"
    at.selectbox(key="upload_target").set_value("Hats").run()
    at.button(key="upload_apply").click().run()
    assert audit_trail(db, bag)[0].new_category == "Hats"
    assert at.checkbox(key=f"up_sel_{bag}").value is False
    assert at.button(key="upload_apply").label == "Apply to all 2 photos"  # the labelled duplicate stays out


def test_b11_after_apply_to_the_selection_the_category_is_reset_so_the_next_click_cannot_label_the_whole_batch(
    db: Database,
) -> None:
    for name in ("Bags", "Hats"):
        add_category(db, name, actor="setup")
    at = run_page("pages/upload.py", session={"signed_in_account": "ivy"})
    _import(at, [(f"p{k}.png", image_bytes("Hats", k), "image/png") for k in range(8)])
    first = card_ids(at)[0]
    at.checkbox(key=f"up_sel_{first}").check().run()
    at.selectbox(key="upload_target").set_value("Hats").run()
    assert at.button(key="upload_apply").label == "Apply to 1 selected"
    at.button(key="upload_apply").click().run()

    assert not at.exception and audit_trail(db, first)[0].new_category == "Hats"
    assert at.selectbox(key="upload_target").value is None  # today: still "Hats"
    apply = at.button(key="upload_apply")
    assert apply.label == "Apply to all 8 photos" and apply.proto.disabled  # nothing can be labelled by one more click
    assert "1 photo labelled Hats" in [s.value.replace("\\", "") for s in at.success]  # not "1 photos"


def test_b1_an_empty_catalogue_offers_a_new_category_and_a_way_to_categories_and_data(db: Database) -> None:
    at = run_page("pages/upload.py", session={"signed_in_account": "jo"})
    _import(at, [(f"p{k}.png", image_bytes("Shoes", k), "image/png") for k in range(2)])
    assert len(card_ids(at)) == 2
    assert [link.proto.label for link in at.get("page_link")] == [
        "Categories & data: add, rename and archive categories, import already-labelled photos"
    ]
    next(t for t in at.text_input if t.label == "New category").input("Sneakers")
    next(b for b in at.button if b.label == "Add category").click().run()

    assert not at.exception and errors_of(at) == []
    first = card_ids(at)[0]
    assert at.pills(key=f"up_pick_{first}_None").options == ["Sneakers"]  # the cards can label with it at once
    at.pills(key=f"up_pick_{first}_None").set_value("Sneakers").run()
    assert audit_trail(db, first)[0].new_category == "Sneakers"


def test_b1_the_batch_picker_takes_a_new_name(db: Database) -> None:
    # Typing the name and applying it is driven in Chromium (AppTest's selectbox cannot type a new option).
    at = run_page("pages/upload.py", session={"signed_in_account": "jo"})
    _import(at, [(f"p{k}.png", image_bytes("Shoes", k), "image/png") for k in range(2)])
    assert at.selectbox(key="upload_target").proto.accept_new_options


def test_b12_singular_wording_and_a_photo_repeated_within_one_upload_is_not_already_in_the_catalogue(
    db: Database,
) -> None:
    at = run_page("pages/upload.py", session={"signed_in_account": "lu"})
    same = image_bytes("Bags", 1)
    _import(at, [("bag.png", same, "image/png"), ("bag-again.png", same, "image/png")])
    assert any(t.value == "1 imported, 1 duplicate, 0 refused" for t in at.text)
    labels = [e.label for e in at.expander]
    assert "Repeated in this upload (1)" in labels and not any(x.startswith("Already in the catalogue") for x in labels)


def test_upload_cards_are_paginated_24_per_page(db: Database) -> None:
    at = run_page("pages/upload.py", session={"signed_in_account": "mo"})
    _import(at, [(f"p{k}.png", image_bytes("Hats", k), "image/png") for k in range(30)])
    assert any(t.value == "30 imported, 0 duplicates, 0 refused" for t in at.text)
    first_page = card_ids(at)
    assert len(first_page) == 24
    at.pagination(key="upload_page").set_value(2).run()
    assert len(card_ids(at)) == 6 and not set(card_ids(at)) & set(first_page)
    assert at.button(key="upload_apply").label == "Apply to all 30 photos"  # the whole upload, not the page


def test_an_admin_deletes_an_uploaded_photo_from_its_card_and_a_labeller_sees_no_delete(accounts: Database) -> None:
    from sqlalchemy import select

    from core.schema import ImageEvent
    from core.views.review import review_items

    files = [(f"p{k}.png", image_bytes("Hats", 40 + k), "image/png") for k in range(3)]
    labeller = _import(run_page("pages/upload.py", session={"signed_in_account": "lea"}), files[:1])
    assert len(card_ids(labeller)) == 1
    assert not [b for b in labeller.button if b.key and "delete" in b.key]  # a labeller may not delete

    admin = _import(run_page("pages/upload.py", session={"signed_in_account": "ada"}), files[1:])
    shown = card_ids(admin)
    gone, kept = shown
    admin.text_input(key=f"up_delete_reason_{gone}").input("wrong product")
    admin.button(key=f"up_delete_{gone}").click().run()

    assert not admin.exception and errors_of(admin) == []
    assert card_ids(admin) == [kept] and [i.image_id for i in review_items(accounts, shown)] == [kept]
    assert any(t.value == "2 imported, 0 duplicates, 0 refused, 1 deleted since" for t in admin.text)
    assert any(s.value.replace("\\", "").startswith(f"Deleted #{gone} p1.png (wrong product)") for s in admin.success)
    with accounts.read() as session:
        events = session.execute(select(ImageEvent.image_id, ImageEvent.actor, ImageEvent.action, ImageEvent.note))
        [(image_id, actor, action, note)] = events.all()
    assert (image_id, actor, action) == (gone, "ada", "delete") and "wrong product" in note
    assert admin.button(key="upload_apply").label == "Apply to the 1 photo"  # the bulk bar counts what is left


def test_an_import_stopped_by_a_full_disk_keeps_what_it_stored_and_resumes_the_rest(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second batch's transaction fails (the disk filled): the first batch's photos stay stored and are reported
    # above the error, the upload's record counts them, and the button imports only the rest.
    monkeypatch.setattr(importer, "BATCH_ROWS", 2)
    monkeypatch.setattr(importer, "BATCH_SECONDS", 3600.0)
    real_write = importer._RowWriter.write
    calls: list[int] = []

    def fails_second_time(writer: importer._RowWriter) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real_write(writer)

    monkeypatch.setattr(importer._RowWriter, "write", fails_second_time)
    files = [(f"shoe_{k}.png", image_bytes("Shoes", k), "image/png") for k in range(5)]
    at = _import(run_page("pages/upload.py"), files)

    assert not at.exception
    assert [e.replace("\\", "") for e in errors_of(at)] == [
        "the disk holding the data directory 'data' is full: free some space, then try again; the step that failed "
        "was not saved"
    ]
    assert any(w.value == "The import stopped on an error. Stored before it:" for w in at.warning)
    assert any(s.value.startswith("2 imported, 0 duplicates, 0 refused") for s in at.success)
    warnings = [w.value.replace("\\", "") for w in at.warning]  # as Markdown escapes it
    assert any(w.startswith("Import interrupted: 2 of 5 files stored; 3 not imported") for w in warnings), warnings
    assert catalogue_stats(db).total_images == 2

    at = next(b for b in at.button if b.label == "Import the remaining 3 files").click().run()
    assert not at.exception and errors_of(at) == []
    assert catalogue_stats(db).total_images == 5
    assert any(t.value.startswith("5 imported, 0 duplicates, 0 refused") for t in at.text)


def test_a_stopped_import_leaves_pending_what_it_did_not_finish_same_names_and_zips_included() -> None:
    chunk = [Upload("a.png", b"1"), Upload("a.png", b"2"), Upload("b.zip", b"3"), Upload("c.png", b"4")]
    batch = Batch.start(chunk, category=None)
    # Stored before the error: the first a.png only. Its namesake, the zip and c.png stay to import.
    partial = ImportResult(imported=[ImportedItem("a.png", 1, None)])
    batch.add_stopped(partial, chunk)
    assert batch.imported == [("a.png", 1)] and [u.data for u in batch.pending] == [b"2", b"3", b"4"]
    # The second a.png was refused and the zip got half-way: the zip and what follows it stay to import.
    more = ImportResult(imported=[ImportedItem("b.zip/x.png", 3, None)], refused=[RefusedItem("a.png", "broken")])
    batch.add_stopped(more, batch.pending)
    assert batch.imported == [("a.png", 1)] and batch.refused == [("a.png", "broken")]
    assert [u.name for u in batch.pending] == ["b.zip", "c.png"] and batch.processed == 2
