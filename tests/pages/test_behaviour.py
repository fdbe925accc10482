"""What people do on the pages changes the database as they expect (AppTest, real SQLite)."""

from __future__ import annotations

from core.catalog.labels import audit_trail
from core.db import Database
from core.jobs.queue import list_jobs, live_workers, register_worker
from core.ml.training import training_plan
from core.ml.versions import activate_version, checkpoint_files
from core.views.dashboard import cell_review_filters
from tests.core.factories import FakeImage, build, populate
from tests.core.training_helpers import save_random_version
from tests.pages.helpers import card_ids, errors_of, run_page

SHOES, BAGS, HATS = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def _mixed(p: tuple[float, float, float]) -> tuple[float, ...]:
    # Mostly `p`, never certain: a prediction with a visible confidence below 100%.
    return tuple(0.8 * v + 0.1 for v in p)


def test_picking_a_category_on_the_review_page_relabels_and_audits(db: Database) -> None:
    made = build(
        db,
        [
            FakeImage(split="test", label="Shoes", probs=_mixed(BAGS), name="boot.jpg"),
            FakeImage(split="train", label="Hats", probs=_mixed(HATS), name="cap.jpg"),
        ],
    )
    boot = int(made.image_ids[0])
    at = run_page("pages/review.py", session={"signed_in_account": "alice"})
    assert boot in card_ids(at)

    key = f"rv_pick_{boot}_Shoes"
    at.pills(key=key).set_value("Bags").run()

    assert not at.exception and errors_of(at) == []
    trail = audit_trail(db, boot)
    assert trail[0].actor == "alice"
    assert (trail[0].old_category, trail[0].new_category) == ("Shoes", "Bags")
    # The prediction the person saw is kept with the change.
    assert trail[0].predicted_category == "Bags" and trail[0].model_version_id == made.version_id
    # The card now shows the new label.
    assert any(t.value.startswith("Label: Bags") for t in at.text)


def test_accepting_the_prediction_then_undo_restores_the_label(db: Database) -> None:
    made = build(db, [FakeImage(split="val", label=None, probs=_mixed(HATS), name="beanie.png")])
    image = int(made.image_ids[0])
    at = run_page("pages/review.py", session={"signed_in_account": "bob"})
    at.button(key=f"rv_accept_{image}").click().run()
    assert audit_trail(db, image)[0].new_category == "Hats"

    next(b for b in at.button if b.label == "Undo my last change").click().run()
    trail = audit_trail(db, image)
    assert trail[0].action == "undo" and trail[0].new_category is None
    assert any(t.value.startswith("Label: (unlabelled)") for t in at.text)


def test_keyboard_review_labels_with_a_key_and_moves_on(db: Database) -> None:
    made = build(
        db,
        [
            FakeImage(split="train", label=None, probs=_mixed(BAGS), name="tote.jpg"),
            FakeImage(split="train", label=None, probs=_mixed(HATS), name="cap.jpg"),
        ],
    )
    ids = [int(i) for i in made.image_ids]
    at = run_page("pages/review.py", session={"signed_in_account": "kim"})
    at.toggle(key="review_keyboard").set_value(True).run()
    first = next(i for i in ids if any(b.key == f"kb_pick_{i}_1" for b in at.button))
    other = next(i for i in ids if i != first)
    keys = {b.key: b for b in at.button if b.key and b.key.startswith(f"kb_pick_{first}_")}
    assert len(keys) == 3  # three categories, on keys 1-3 in name order: Bags, Hats, Shoes
    assert keys[f"kb_pick_{first}_1"].label.startswith("Bags") and "82" in keys[f"kb_pick_{first}_1"].label

    keys[f"kb_pick_{first}_3"].click().run()  # the person disagrees with the model
    assert not at.exception and errors_of(at) == []
    [event] = audit_trail(db, first)
    assert event.actor == "kim" and event.new_category == "Shoes" and event.predicted_category in ("Bags", "Hats")
    assert any(b.key == f"kb_pick_{other}_1" for b in at.button)  # the next photo came up

    at.button(key=f"kb_skip_{other}").click().run()
    assert [(e.action, e.actor, e.new_category) for e in audit_trail(db, other)] == [("skip", "kim", None)]  # no change
    assert any("Every photo on this page is done" in i.value for i in at.info)


def test_bulk_relabel_of_selected_images(db: Database) -> None:
    made = build(db, [FakeImage(split="train", label="Shoes", probs=_mixed(SHOES), name=f"s{k}.jpg") for k in range(3)])
    first, second, third = (int(i) for i in made.image_ids)
    at = run_page("pages/review.py", session={"signed_in_account": "cara"})
    at.checkbox(key=f"rv_sel_{first}").check()
    at.checkbox(key=f"rv_sel_{third}").check()
    at.selectbox(key="review_bulk_target").set_value("Hats")
    next(b for b in at.button if b.label == "Relabel selected").click().run()
    assert [audit_trail(db, i)[0].new_category for i in (first, second, third)] == ["Hats", "Shoes", "Hats"]
    assert audit_trail(db, first)[0].action == "bulk"
    assert audit_trail(db, first)[0].predicted_category == "Shoes"  # what the grid showed is in the audit row


def test_retrain_button_queues_exactly_one_job_and_is_disabled_while_it_is_live(db: Database) -> None:
    populate(db, n_images=300, categories=("Shoes", "Bags", "Hats"), labelled_fraction=0.9, seed=3)
    assert training_plan(db, mode="quick").ok
    # A live worker (as if on another machine): the page must not start one, and the job stays queued.
    register_worker(db, "test-worker-elsewhere")
    at = run_page("pages/train.py", session={"signed_in_account": "dana"})
    at.radio[0].set_value("quick").run()
    retrain = next(b for b in at.button if b.label.startswith("Retrain"))
    retrain.click().run()
    assert not at.exception and errors_of(at) == []
    jobs = list_jobs(db)
    assert [(j.status, j.mode, j.requested_by) for j in jobs] == [("queued", "quick", "dana")]
    assert [w["id"] for w in live_workers(db)] == ["test-worker-elsewhere"]  # no second worker was started

    # No second job: the button is disabled (a browser cannot click it), with the reason next to it.
    assert [s.value for s in at.success] == [f"Training job \\#{jobs[0].id} queued\\."]
    retrain = next(b for b in at.button if b.label.startswith("Retrain"))
    assert retrain.disabled
    assert any(f"#{jobs[0].id} is queued" in c.value for c in at.caption)
    assert len(list_jobs(db)) == 1


def test_a_confusion_matrix_cell_filters_the_review_grid(db: Database) -> None:
    made = build(
        db,
        [
            FakeImage(split="test", label="Shoes", probs=_mixed(BAGS), name="shoe_as_bag_1.jpg"),
            FakeImage(split="test", label="Shoes", probs=_mixed(SHOES), name="shoe_ok.jpg"),
            FakeImage(split="test", label="Shoes", probs=_mixed(BAGS), name="shoe_as_bag_2.jpg"),
            FakeImage(split="train", label="Shoes", probs=_mixed(BAGS), name="train_shoe_as_bag.jpg"),
            FakeImage(split="test", label="Bags", probs=_mixed(SHOES), name="bag_as_shoe.jpg"),
        ],
    )
    # What a click on the cell (true Shoes, predicted Bags) stores before switching to the review page.
    cell = cell_review_filters("Shoes", "Bags", version_id=made.version_id).as_kwargs()
    at = run_page("pages/review.py", session={"review_cell": cell})
    assert sorted(card_ids(at)) == [int(made.image_ids[0]), int(made.image_ids[2])]

    next(b for b in at.button if b.label == "Show all images again").click().run()
    assert sorted(card_ids(at)) == sorted(int(i) for i in made.image_ids)


def test_dashboard_shows_the_confusion_matrix_and_scores(db: Database) -> None:
    build(
        db,
        [
            FakeImage(split="test", label="Shoes", probs=_mixed(SHOES)),
            FakeImage(split="test", label="Bags", probs=_mixed(SHOES)),
            FakeImage(split="test", label="Hats", probs=_mixed(HATS)),
            FakeImage(split="test", label="Bags", probs=_mixed(BAGS)),
        ],
    )
    at = run_page("pages/dashboard.py")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy"] == "75.0%"
    assert metrics["Test images"] == "4"
    assert any(s.value == "Confusion matrix" for s in at.subheader)


def test_categories_page_offers_the_active_model_as_one_download_or_says_what_is_missing(db: Database) -> None:
    version = save_random_version(db, ["Shoes", "Bags"], seed=1)
    activate_version(db, version, actor="ana")
    at = run_page("pages/categories.py")
    assert not at.exception and errors_of(at) == []
    assert [b.label for b in at.download_button] == ["Download labels.csv", "Download model (.zip)"]

    _, sidecar = checkpoint_files(db, version)
    sidecar.unlink()
    at = run_page("pages/categories.py")
    shown = [e.replace("\\", "") for e in errors_of(at)]  # the page escapes Markdown punctuation
    assert shown == [f"model v{version}: checkpoint file {sidecar} is missing"]
    assert [b.label for b in at.download_button] == ["Download labels.csv"]
