"""The train page follows a running job from the database and can cancel it; user text is never Markdown."""

from __future__ import annotations

from core.db import Database
from core.jobs.queue import claim_next_job, enqueue_training, get_job, record_progress
from core.ml.contract import ProgressReport
from pages._ui import md_escape
from tests.pages.helpers import run_page


def test_live_progress_of_a_running_job_and_cancel(db: Database) -> None:
    job_id = enqueue_training(db, "quick", {}, "gus")
    claim_next_job(db, "worker-under-test")
    for epoch, loss in ((1, 0.9), (2, 0.5)):
        record_progress(
            db,
            job_id,
            ProgressReport(phase="train", epoch=epoch, epochs=4, loss=loss, train_acc=0.5 + epoch / 10,
                           val_acc=0.4 + epoch / 10, images_per_s=250.0, eta_s=95.0, device="cpu"),
        )  # fmt: skip
    at = run_page("pages/train.py", session={"signed_in_account": "hana"})
    assert not at.exception
    assert any(s.value == f"Training job #{job_id}: running" for s in at.subheader)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Loss": "0.500", "Images/s": "250", "ETA": "1 min 35 s", "Val accuracy": "60.0%"}
    # The device is a caption, so a long one ("cpu (2 threads)") is not cut off like a metric value.
    assert any(c.value.replace("\\", "") == "Device: cpu" for c in at.caption)
    # The sidebar tells every page about the job too.
    assert any("running" in t.value and "epoch 2/4" in t.value for t in at.sidebar.text)

    at.button(key=f"cancel_{job_id}").click().run()
    job = get_job(db, job_id)
    assert job.cancel_requested and "hana" in job.error


def test_user_text_is_escaped_for_markdown() -> None:
    assert md_escape("*sale* [x](http://e.vil) :red[hi] $x$") == (
        r"\*sale\* \[x\]\(http" + "\u2060" + r"\:\/\/e\.vil\) \:red\[hi\] \$x\$"  # a word joiner breaks the autolink
    )


def test_b4_a_quick_run_shows_its_progress_first_without_empty_figures_or_a_one_point_chart(db: Database) -> None:
    job_id = enqueue_training(db, "quick", {}, "gus")
    claim_next_job(db, "worker-under-test")
    record_progress(db, job_id, ProgressReport(phase="caching", step=256, steps=605, device="cpu"))
    record_progress(
        db, job_id, ProgressReport(phase="fit head", epoch=1, epochs=1, train_acc=0.8, val_acc=0.7, device="cpu")
    )
    at = run_page("pages/train.py", session={"signed_in_account": "hana"})
    assert not at.exception
    # The progress block comes right under the title, before the slow parts (hardware check, plan, backbone): after
    # a reload mid-run it is the first thing drawn.
    order = [type(e).__name__ for e in at.main]
    assert order.index("Subheader") < order.index("Radio"), order
    assert at.subheader[0].value == f"Training job #{job_id}: running"
    assert all(m.value != "n/a" for m in at.metric)  # quick mode: no loss, rate or ETA to show, so none shown
    assert at.get("arrow_vega_lite_chart") == [] and at.get("vega_lite_chart") == []  # one epoch: no chart
    assert any(f"#{job_id} is running" in c.value for c in at.caption)
