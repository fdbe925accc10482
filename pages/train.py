"""Train & models: what a retrain would use, THE retrain button, live progress, the newest version against the one
before it, all versions."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.auth import Action
from core.jobs.queue import (
    JobView,
    TrainMode,
    cancel_job,
    current_job,
    enqueue_training,
    ensure_worker,
    list_jobs,
    worker_alive,
)
from core.ml.backbone import next_start
from core.ml.training import suggested_mode, training_plan
from core.ml.versions import AccuracyBasis, AccuracyFigure, activate_version, active_version, list_versions
from core.schema import JobStatus
from core.views.dashboard import version_comparison
from core.views.overview import error_headline, job_progress, training_curves
from pages import _auth, _ui

AUTO = "auto"

db = _ui.get_db()


def _retrain(mode: TrainMode) -> None:
    # A callback, so the page (Retrain button, sidebar) is drawn already knowing the job is queued.
    job_id = _ui.flash_errors(enqueue_training, db, mode, {}, _ui.actor())
    if job_id is not None:
        _ui.flash_errors(ensure_worker, db)  # no live worker on any machine: start one here
        _ui.flash("success", f"Training job #{job_id} queued.")


_ui.show_flash()
st.title("Train & models")
live_job = current_job(db)


# --- live progress --------------------------------------------------------------------------------------------------
def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{int(seconds) // 60} min {int(seconds) % 60} s" if seconds >= 60 else f"{seconds:.0f} s"


def _drawn_state(job: JobView | None) -> tuple[int | None, str | None, int | None]:
    """What the rest of the page was drawn from: the live job, its status, the active version."""
    version = active_version(db)
    return (job.id if job else None, job.status if job else None, version.id if version else None)


@st.fragment(run_every="2s")
def live_progress(drawn: tuple[int | None, str | None, int | None]) -> None:
    """Reads the job from the database every 2 s, so it survives reloads and shows jobs started elsewhere."""
    job = current_job(db)
    if _drawn_state(job) != drawn:
        # A job started, was claimed, ended, or made a new active version since the page was drawn: redraw the
        # whole page, so its captions, Retrain button, comparison and versions agree with this block and the sidebar.
        st.rerun(scope="app")
    if job is None:
        recent = list_jobs(db, limit=1)
        if recent:
            last = recent[0]
            text = f"Last training job #{last.id} ({last.mode}) {last.status}"
            headline = error_headline(last.error)
            if last.status == JobStatus.FAILED:
                st.error(_ui.md_escape(f"{text}: {headline}"))
                if last.error.strip() != headline:
                    with st.expander("Full error", key=f"job_error_{last.id}"):
                        st.code(last.error, language=None)
            else:
                st.text(f"{text}: {headline}" if headline else text)
        return
    if job.status == JobStatus.QUEUED:
        # Its worker may have died before claiming it (or none was ever started): start one here. A read first, so
        # a waiting page does not take the write lock every 2 s; ensure_worker starts at most one per timeout.
        if not worker_alive(db):
            _ui.attempt(ensure_worker, db)
    report = job.report
    st.subheader(f"Training job #{job.id}: {job.status}")
    bar = job_progress(job.progress)
    if bar.fraction is not None:
        st.progress(bar.fraction, text=_ui.md_escape(bar.text))
    else:
        waiting = "waiting for a worker" if job.status == JobStatus.QUEUED else "starting"
        st.text(f"phase: {bar.text or waiting}")
    # Only the figures this run reports (quick mode has no loss, nor a rate before its first step).
    figures = {
        "Loss": None if report.loss is None else f"{report.loss:.3f}",
        "Images/s": None if report.images_per_s is None else f"{report.images_per_s:.0f}",
        "ETA": None if report.eta_s is None else _eta(report.eta_s),
        "Val accuracy": None if report.val_acc is None else _ui.percent(report.val_acc),
    }
    known = {name: value for name, value in figures.items() if value is not None}
    for column, (name, value) in zip(st.columns(4), known.items(), strict=False):
        column.metric(name, value)
    if report.device:
        st.caption(_ui.md_escape(f"Device: {report.device}"))
    # A curve needs two epochs: quick mode's single point would be an invisible chart at "epoch 1.000000".
    curves = {name: frame for name, frame in training_curves(job.history).items() if len(frame) >= 2}
    for column, (name, frame) in zip(st.columns(2), curves.items(), strict=False):
        column.line_chart(frame, x_label="epoch", y_label=name)
    if job.cancel_requested:
        st.text("Cancel requested: the worker stops after the current step.")
    elif _auth.may(Action.TRAIN) and st.button("Cancel training", key=f"cancel_{job.id}"):
        _ui.attempt(cancel_job, db, job.id, actor=_ui.actor())


live_progress(_drawn_state(live_job))


# --- what would be trained ------------------------------------------------------------------------------------------
with st.spinner("Checking the hardware..."):  # the first visit imports torch to look for a GPU
    suggested = suggested_mode(db.settings)
choice = st.radio(
    "Mode",
    [AUTO, *TrainMode],
    horizontal=True,
    key="train_mode",
    format_func=lambda m: f"picked by hardware ({suggested})" if m == AUTO else m,
    help="quick: refit only the classifier head on cached features (seconds, fine on a CPU). "
    "full: fine-tune every layer (minutes on a GPU).",
)
mode = suggested if choice == AUTO else choice
plan = training_plan(db, mode=mode)
since = (
    "no model yet"
    if plan.active_version_id is None
    else f"{plan.corrections_since_active} correction{'' if plan.corrections_since_active == 1 else 's'} since the "
    f"active model v{plan.active_version_id}"
)
st.text(f"{plan.labelled} labelled images in {len(plan.trainable)} categories; {since}.")
if plan.categories:
    st.dataframe(
        [
            {"category": c.name, "train": c.train, "val": c.val, "test": c.test, "total": c.total}
            for c in plan.categories
        ],
        hide_index=True,
        height="content",
    )
for problem in plan.problems:
    st.warning(_ui.md_escape(problem))
for note in plan.notes:
    st.caption(_ui.md_escape(note))

# Which backbone and weights the next model starts from (file names are user text: escaped, never markup).
start = next_start(db, labelled=plan.labelled)
if start.problem is not None:
    st.error(_ui.md_escape(start.problem))
elif start.new_lineage:
    headline = _ui.md_escape(f"Backbone of the next model: {start.description}")
    if start.random_start:
        st.warning(headline)
    else:
        st.info(headline)
    if start.expected is not None:
        st.caption(_ui.md_escape(start.expected.describe(start.labelled)))
else:
    st.caption(_ui.md_escape(start.description))
for note in start.notes:
    st.warning(_ui.md_escape(note))

if not _auth.may(Action.TRAIN):
    st.caption(f"Retraining needs a trainer account; you are signed in as a {_auth.current().role.value}.")
else:
    st.button(
        f"Retrain ({mode})",
        type="primary",
        disabled=not plan.ok or live_job is not None or start.problem is not None,
        help=None if start.problem is None else _ui.md_escape(f"Retrain is disabled: {start.problem}"),
        on_click=_retrain,
        args=(mode,),
    )
if start.problem is not None:
    st.caption("Retrain is disabled until the pretrained weights above can be used.")
if live_job is not None:
    st.caption(f"Training job #{live_job.id} is {live_job.status}: Retrain is available again once it ends.")


# --- the newest version against the one before it, promote / roll back ----------------------------------------------
versions = list_versions(db)
active = active_version(db)
if not versions:
    st.info("No model versions yet.")
    st.stop()

comparison = version_comparison(versions)
if comparison is not None:
    new, old = f"v{comparison.newest_id}", f"v{comparison.baseline_id}"
    st.subheader(f"Newest version {new} against {old}")
    st.text(comparison.headline)
    st.caption(f"{old}: {comparison.baseline_role}.")

    def _delta(new_value: float | None, old_value: float | None) -> str | None:
        if new_value is None or old_value is None:
            return None
        return f"{(new_value - old_value) * 100:+.1f} points vs {old}"

    scores = st.columns(4)
    scores[0].metric(
        f"{new} test accuracy",
        _ui.percent(comparison.newest_accuracy),
        delta=_delta(comparison.newest_accuracy, comparison.baseline_accuracy),
    )
    scores[1].metric(f"{old} test accuracy", _ui.percent(comparison.baseline_accuracy))
    scores[2].metric(
        f"{new} macro F1",
        _ui.percent(comparison.newest_macro_f1),
        delta=_delta(comparison.newest_macro_f1, comparison.baseline_macro_f1),
    )
    scores[3].metric(f"{old} macro F1", _ui.percent(comparison.baseline_macro_f1))
    newest = next(v for v in versions if v.id == comparison.newest_id)
    if comparison.same_images:  # the promotion check re-measured the old version on the new one's test images
        baseline = AccuracyFigure(
            comparison.baseline_accuracy, newest.test_images, AccuracyBasis.SAME_IMAGES, of_version=newest.id
        )
        st.caption(_ui.md_escape(f"{new}: {newest.accuracy.describe()}; {old}: {baseline.describe()}."))
    else:
        st.caption(_ui.md_escape(f"Each measured when it was trained. {new}: {newest.accuracy.describe()}."))
    if not comparison.per_class.empty:
        table, formats = _ui.percent_columns(comparison.per_class, comparison.per_class.columns[1:])
        st.dataframe(table, hide_index=True, height="content", column_config=formats)

st.subheader("All versions")
rows = [
    {
        "version": f"v{v.id}",
        "status": v.status,
        "mode": v.mode,
        "arch": v.arch,
        "image px": v.image_size,
        "test accuracy": v.test_accuracy,
        "macro F1": v.macro_f1,
        "ECE": v.ece,
        "backbone source": v.pretrained_source,
        "created (UTC)": v.created_at.strftime("%Y-%m-%d %H:%M"),
    }
    for v in versions
]
table, formats = _ui.percent_columns(pd.DataFrame(rows), ["test accuracy", "macro F1"])
st.dataframe(
    table,
    hide_index=True,
    height="content",
    column_config={**formats, "ECE": st.column_config.NumberColumn(format="%.3f")},
)
labels = {v.id: v.label for v in versions if active is None or v.id != active.id}
if labels and _auth.may(Action.ACTIVATE):
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    pick = left.selectbox(
        "Serve another version (promote a candidate or roll back)", labels, format_func=labels.get, key="activate_pick"
    )
    if right.button("Activate", width="stretch"):
        ok, view = _ui.attempt(activate_version, db, pick, actor=_ui.actor())
        if ok:
            # Images imported since this version last served lack its predictions: a worker fills them in.
            _ui.attempt(ensure_worker, db)
            _ui.flash("success", f"Now serving {view.label}")
            _ui.flash(
                "caption", "Predictions for images added since this version are being refreshed in the background."
            )
            st.rerun()
