"""The Train & models page as a person reads it: the plan's wording, progress in quick mode, a failed job's error,
and what became of the newest version (AppTest, real SQLite)."""

from __future__ import annotations

from core.db import Database
from core.jobs import ProgressReport, claim_next_job, enqueue_training, fail_job, record_progress
from pages._ui import md_escape
from tests.core.training_helpers import add_version_row
from tests.pages.helpers import errors_of, run_page

TRACEBACK = (
    "ValueError: matmul: Input operand 1 has a mismatch in its core dimension 0\n\n"
    "Traceback (most recent call last):\n"
    '  File "<string>", line 11, in <module>\n'
    '  File "<string>", line 10, in inner\n'
    "ValueError: matmul: Input operand 1 has a mismatch in its core dimension 0"
)


def test_an_empty_catalogue_reads_as_sentences(data_dir: object) -> None:
    at = run_page("pages/train.py")
    assert not at.exception
    assert "0 labelled images in 0 categories; no model yet." in [t.value for t in at.text]
    assert [w.value.replace("\\", "") for w in at.warning] == ["add at least 2 categories and label images in each"]
    assert next(b for b in at.button if b.label.startswith("Retrain")).disabled


def test_quick_mode_progress_moves_with_steps_and_draws_no_empty_chart(db: Database) -> None:
    job_id = enqueue_training(db, "quick", {}, "gus")
    claim_next_job(db, "worker-under-test")
    # Quick mode caches pixels, then embeds them: steps only, no epochs, no loss.
    record_progress(db, job_id, ProgressReport(phase="caching", step=120, steps=300, device="cpu (2 threads)"))
    at = run_page("pages/train.py")
    assert not at.exception
    [bar] = at.get("progress")
    assert bar.proto.value == 40 and bar.proto.text.replace("\\", "") == "caching 120/300"
    assert any(c.value.replace("\\", "") == "Device: cpu (2 threads)" for c in at.caption)
    assert len(at.get("vega_lite_chart")) == 0  # no curve yet: no empty chart

    record_progress(
        db,
        job_id,
        ProgressReport(phase="fitting head", epoch=1, epochs=1, step=1, steps=1, train_acc=0.9, val_acc=0.8),
    )
    at = run_page("pages/train.py")
    assert len(at.get("vega_lite_chart")) == 1  # accuracy only: quick mode has no loss curve


def test_a_failed_job_shows_its_message_and_keeps_the_traceback_in_an_expander(db: Database) -> None:
    job_id = enqueue_training(db, "quick", {}, "gus")
    claim_next_job(db, "worker-under-test")
    fail_job(db, job_id, TRACEBACK)
    at = run_page("pages/train.py")
    assert not at.exception
    headline = TRACEBACK.splitlines()[0]
    assert errors_of(at) == [md_escape(f"Last training job #{job_id} (quick) failed: {headline}")]
    [expander] = at.expander
    assert expander.label == "Full error" and [c.value for c in expander.code] == [TRACEBACK]
    # The sidebar (on every page) has the first line only.
    [line] = [t.value for t in at.sidebar.text if t.value.startswith("Last training job")]
    assert line == f"Last training job #{job_id} failed: {headline}"


def _version(db: Database, *, status: str, accuracy: float, promotion: dict | None = None) -> int:
    per_class = {"Shoes": {"recall": accuracy, "f1": accuracy}, "Bags": {"recall": accuracy, "f1": accuracy}}
    metrics = {"test": {"macro_f1": accuracy, "per_class": per_class}, "promotion": promotion or {}}
    return add_version_row(db, status=status, accuracy=accuracy, metrics=metrics, test_hash="same")


def test_after_a_rollback_the_comparison_says_what_happened(db: Database) -> None:
    first = _version(db, status="active", accuracy=0.5)
    second = _version(
        db,
        status="retired",
        accuracy=0.75,
        promotion={"promoted": True, "reason": "not worse than the active version", "active_version": first,
                   "active_accuracy_same_images": 0.5},
    )  # fmt: skip
    at = run_page("pages/train.py")
    assert not at.exception
    assert any(s.value == f"Newest version v{second} against v{first}" for s in at.subheader)
    texts = [t.value for t in at.text]
    assert (
        f"v{second} replaced v{first}: accuracy 75% vs 50% on the same test images. "
        f"It was retired later: v{first} serves now."
    ) in texts
    assert not any("Not promoted" in t for t in texts)
    # Overall scores are metrics with their real names, not an "overall accuracy" row under "recall".
    metrics = {m.label: m.value for m in at.metric}
    assert metrics[f"v{second} test accuracy"] == "75.0%" and metrics[f"v{first} test accuracy"] == "50.0%"
    assert metrics[f"v{second} macro F1"] == "75.0%"
    [table] = [d.value for d in at.dataframe if f"v{second} recall" in d.value.columns]
    assert table["category"].tolist() == ["Shoes", "Bags"]
    assert table.columns.tolist() == ["category", f"v{first} recall", f"v{second} recall", f"v{first} F1",
                                      f"v{second} F1"]  # fmt: skip
